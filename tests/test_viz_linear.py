"""Smoke tests for tputil.viz.linear: the column/row split figure of chapter 3."""

import pytest
import torch
from matplotlib.figure import Figure

from tputil.viz import linear as vl


def _gids(fig):
    return [patch.get_gid() for ax in fig.axes for patch in ax.patches if patch.get_gid()]


@pytest.mark.parametrize("p", [1, 2, 4])
def test_one_patch_per_rank_for_each_split_piece(p):
    K, N = 8, 12
    weight = torch.randn(N, K)  # nn.Linear layout: (out_features, in_features) = A^T
    fig = vl.draw_linear_split(list(weight.chunk(p, 0)), list(weight.chunk(p, 1)), 4, title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    gids = _gids(fig)
    for piece in ("column-A", "column-Y", "row-X", "row-A", "row-partial"):
        assert sorted(g for g in gids if g.startswith(piece + "-")) == sorted(f"{piece}-device{r}" for r in range(p))
    fig.canvas.draw()


def test_shapes_come_from_the_shards_and_are_checked():
    weight = torch.zeros(12, 8)
    assert vl.split_shapes(list(weight.chunk(4, 0)), list(weight.chunk(4, 1))) == (4, 8, 12)
    fig = vl.draw_linear_split(list(weight.chunk(4, 0)), list(weight.chunk(4, 1)), 4)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "A (8, 12): rank r holds (8, 3)" in texts and "A (8, 12): rank r holds (2, 12)" in texts
    with pytest.raises(ValueError, match=r"do not split the same A\[K, N\] over p=2 ranks"):
        vl.split_shapes(list(weight.chunk(2, 0)), list(torch.zeros(12, 6).chunk(2, 1)))
    with pytest.raises(ValueError, match=r"one column shard and one row shard per rank: got 2 and 3"):
        vl.split_shapes(list(weight.chunk(2, 0)), list(torch.zeros(12, 9).chunk(3, 1)))
