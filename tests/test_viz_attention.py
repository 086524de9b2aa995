"""Smoke tests for tputil.viz.attention (chapter 5): who holds which row of c_attn, computed and drawn."""

import pytest
import torch
from matplotlib.figure import Figure

from tputil.viz.attention import c_attn_misread, c_attn_rows, draw_c_attn_split


def _gids(fig: Figure) -> list[str]:
    return [patch.get_gid() for ax in fig.axes for patch in ax.patches if patch.get_gid()]


def test_c_attn_rows_takes_each_ranks_heads_from_q_k_and_v():
    # C = 8, 2 ranks: rank 0 holds the first half of each of q, k, v
    assert c_attn_rows(24, 2, stride=3) == [
        [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19],
        [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23],
    ]
    assert c_attn_rows(24, 2, stride=1) == [list(range(12)), list(range(12, 24))]


@pytest.mark.parametrize("p, misread", [(1, 0), (2, 96), (3, 96), (6, 128)])
def test_misread_rows_of_the_contiguous_split(p, misread):
    assert c_attn_misread(144, p, stride=3) == 0
    assert c_attn_misread(144, p, stride=1) == misread


@pytest.mark.parametrize("p", [1, 2, 3, 6])
def test_every_row_is_drawn_once_per_split_in_its_ranks_color(p):
    fig = draw_c_attn_split(torch.zeros(144, 48), n_head=6, p=p, title="t")
    gids = _gids(fig)
    for split in ("strided", "contiguous"):
        owners = [g for g in gids if g.startswith(f"{split}-row")]
        assert len(owners) == 144
        for r in range(p):
            assert sum(g.endswith(f"-device{r}") for g in owners) == 144 // p
    assert sum(g.startswith("strided-misread") for g in gids) == 0
    assert sum(g.startswith("contiguous-misread") for g in gids) == c_attn_misread(144, p, stride=1)
    fig.canvas.draw()


def test_draw_c_attn_split_rejects_a_degree_that_does_not_divide_the_heads():
    with pytest.raises(ValueError, match=r"n_head=6 is not divisible by p=4.*\[1, 2, 3, 6\]"):
        draw_c_attn_split(torch.zeros(144, 48), n_head=6, p=4)
