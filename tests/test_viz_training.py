"""Smoke tests for tputil.viz.training (chapter 9): the figures are drawn from real shapes and losses,
with the right parts."""

import pytest
import torch
from matplotlib.figure import Figure

from tputil import train as tr
from tputil.shard import shard_tensor
from tputil.viz.training import draw_conjugate_pair, draw_loss_curves


def _patch_gids(fig: Figure) -> list:
    return [patch.get_gid() for ax in fig.axes for patch in ax.patches if patch.get_gid()]


def _line_gids(fig: Figure) -> list:
    return sorted(line.get_gid() for ax in fig.axes for line in ax.lines if line.get_gid())


def _pair(p, K=16, H=32, N=12):
    torch.manual_seed(0)
    first, second = torch.nn.Linear(K, H), torch.nn.Linear(H, N)
    x = torch.randn(2, 4, K)
    a = [shard_tensor(first.weight.detach(), r, p, 0) for r in range(p)]
    b = [shard_tensor(second.weight.detach(), r, p, 1) for r in range(p)]
    return x, a, b


@pytest.mark.parametrize("p", [2, 4])
def test_conjugate_pair_has_a_box_per_rank_and_one_all_reduce_per_pass(p):
    x, a, b = _pair(p)
    fig = draw_conjugate_pair(x, a, b, title="t")
    assert isinstance(fig, Figure)
    gids = _patch_gids(fig)
    names = {"forward": ["X", "X-copy", "H", "Y-partial", "Y"], "backward": ["dX", "dX-partial", "dH", "dY-copy", "dY"]}
    for phase, cols in names.items():
        for name in cols:
            assert [g for g in gids if g.startswith(f"{phase}-{name}-device")] == [
                f"{phase}-{name}-device{r}" for r in range(p)
            ]
    connectors = sorted(g for g in gids if g.endswith(("-identity", "-all-reduce")))
    assert connectors == ["backward-f-all-reduce", "backward-g-identity", "forward-f-identity", "forward-g-all-reduce"]
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert f"(8, {32 // p})" in labels and "(8, 16)" in labels and "(8, 12)" in labels  # real shapes
    fig.canvas.draw()  # renders without error


def test_conjugate_pair_at_p1_has_no_all_reduce_and_rejects_shards_that_do_not_fit():
    x, a, b = _pair(1)
    gids = _patch_gids(draw_conjugate_pair(x, a, b))
    assert not [g for g in gids if g.endswith("all-reduce")]
    assert sum(g.endswith("-identity") for g in gids) == 4
    x, a, b = _pair(2)
    with pytest.raises(ValueError, match="one shard of each weight per rank"):
        draw_conjugate_pair(x, a, b[:1])
    with pytest.raises(ValueError, match="do not fit"):
        draw_conjugate_pair(x[..., :8], a, b)


def test_loss_curves_draw_every_run_its_gaps_and_the_tolerance():
    dense = [5.0 - 0.05 * s for s in range(20)]
    ulp = 2.0**-22
    tp = {2: [v + (ulp if s % 3 == 0 else 0.0) for s, v in enumerate(dense)], 4: list(dense)}
    fig = draw_loss_curves(dense, tp, tolerance=lambda s: tr.loss_tolerance(torch.float32, s), title="t")
    assert _line_gids(fig) == sorted(
        [
            "loss-dense",
            "loss-tp-p2",
            "loss-tp-p4",
            "gap-tp-p2",
            "gap-tp-p4",
            "gap-zero-tp-p2",
            "gap-zero-tp-p4",
            "tolerance",
        ]
    )
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.lines if line.get_gid()}
    assert len(lines["gap-tp-p2"].get_xdata()) == 7 and len(lines["gap-zero-tp-p2"].get_xdata()) == 13
    assert len(lines["gap-tp-p4"].get_xdata()) == 0 and len(lines["gap-zero-tp-p4"].get_xdata()) == 20
    assert fig.axes[1].get_yscale() == "log"
    fig.canvas.draw()


def test_loss_curves_reject_runs_of_different_lengths():
    with pytest.raises(ValueError, match="the run on p=2 ranks has 3 losses, the dense run 4"):
        draw_loss_curves([1.0, 2.0, 3.0, 4.0], {2: [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="empty"):
        draw_loss_curves([], {})
