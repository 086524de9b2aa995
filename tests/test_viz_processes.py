"""Smoke tests for tputil.viz.processes: the launch picture and the timeline of chapter 8."""

import pytest
from matplotlib.figure import Figure

from tputil.viz import processes as vp


def _gids(fig):
    return [patch.get_gid() for ax in fig.axes for patch in ax.patches if patch.get_gid()]


@pytest.mark.parametrize("p", [1, 2, 4])
def test_launch_draws_the_parent_the_store_every_rank_and_every_link(p):
    fig = vp.draw_launch(p, title="t")
    assert isinstance(fig, Figure)
    gids = _gids(fig)
    assert gids.count("parent") == 1 and gids.count("store") == 1
    assert [g for g in gids if g.startswith("rank")] == [f"rank{r}" for r in range(p)]
    assert sorted(g for g in gids if g.startswith("link")) == sorted(
        f"link{r}-{s}" for r in range(p) for s in range(r + 1, p)
    )
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert f"RANK={p - 1}  WORLD_SIZE={p}" in texts
    fig.canvas.draw()


def test_launch_refuses_too_many_ranks():
    with pytest.raises(ValueError, match="draw 1 to 8 ranks"):
        vp.draw_launch(9)


def test_timeline_draws_each_pass_and_each_all_reduce():
    passes = [
        dict(one_pass=0.008, all_reduces=[(0.001 * i, 0.001 * i + 0.0005) for i in range(8)]),
        dict(one_pass=0.007, all_reduces=[(0.001 * i, 0.001 * i + 0.0002) for i in range(8)]),
    ]
    fig = vp.draw_timeline(passes, title="one forward")
    gids = _gids(fig)
    for r in range(2):
        assert gids.count(f"rank{r}-pass") == 1
        assert sum(g.startswith(f"rank{r}-all_reduce") for g in gids) == 8
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert " 50% in all-reduces" in texts
    fig.canvas.draw()


def test_timeline_refuses_spans_that_make_no_sense():
    with pytest.raises(ValueError, match="must start at or after 0"):
        vp.draw_timeline([dict(one_pass=0.01, all_reduces=[(0.002, 0.001)])])
    with pytest.raises(ValueError, match="at least one rank"):
        vp.draw_timeline([])
