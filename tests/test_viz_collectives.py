"""Smoke tests for tputil.viz.collectives: the four-collectives figure of chapter 2."""

import pytest
import torch
from matplotlib.figure import Figure

from tputil.viz import collectives as vc


def _gids(fig):
    return [patch.get_gid() for ax in fig.axes for patch in ax.patches if patch.get_gid()]


def _texts(ax):
    return [t.get_text() for t in ax.texts]


@pytest.mark.parametrize("p", [1, 2, 4])
def test_two_boxes_per_device_in_each_of_four_panels(p):
    xs = [(r + 1) * torch.arange(1.0, 5.0) for r in range(p)]
    fig = vc.draw_collectives(xs, title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    gids = _gids(fig)
    for kind, _, _ in vc.PANELS:
        for r in range(p):
            assert gids.count(f"{kind}-device{r}-before") == 1
            assert gids.count(f"{kind}-device{r}-after") == 1
    assert len(gids) == 4 * 2 * p
    fig.canvas.draw()


def test_panels_show_the_computed_numbers():
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])]
    fig = vc.draw_collectives(xs, src=1)
    reduce_, gather, scatter, bcast = fig.axes
    assert _texts(reduce_).count("11") == 2 and _texts(reduce_).count("22") == 2
    assert _texts(gather).count("20") == 1 + 2  # before on device 1, after on both
    assert _texts(scatter).count("11") == 1 and _texts(scatter).count("22") == 1
    assert _texts(bcast).count("10") == 1 + 2  # src=1's tensor everywhere
    assert "broadcast: every device: device 1's tensor" == bcast.get_title()


def test_describe_lists_every_device():
    text = vc.describe([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])
    assert "all-gather: device 0 [1, 2, 3, 4] | device 1 [1, 2, 3, 4]" in text
    assert "reduce-scatter: device 0 [4] | device 1 [6]" in text


def test_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError, match=r"draws 1-D tensors"):
        vc.draw_collectives([torch.zeros(2, 2), torch.zeros(2, 2)])
    with pytest.raises(ValueError, match=r"4 devices x 8 numbers = 32 numbers"):
        vc.draw_collectives([torch.zeros(8)] * 4)
    with pytest.raises(ValueError, match=r"not divisible by 2"):
        vc.draw_collectives([torch.zeros(3)] * 2)


def test_timings_figure_has_measurements_model_and_both_regimes():
    from tputil.course import cost

    sizes = [4096 * 4**k for k in range(6)]
    times = [cost.ring_time("all_reduce", n, 2, latency=2e-4, bandwidth=4e8) for n in sizes]
    fig = vc.draw_all_reduce_timings(sizes, times, p=2, latency=2e-4, bandwidth=4e8, title="t")
    ax = fig.axes[0]
    gids = [line.get_gid() for line in ax.lines]
    for gid in ("measured", "model", "latency-bound", "bandwidth-bound", "crossover"):
        assert gids.count(gid) == 1
    measured = ax.lines[gids.index("measured")]
    assert list(measured.get_xdata()) == sizes
    assert list(measured.get_ydata()) == pytest.approx([t * 1e3 for t in times])
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    fig.canvas.draw()
    with pytest.raises(ValueError, match=r"need one time per size"):
        vc.draw_all_reduce_timings(sizes, times[:-1], p=2, latency=1e-4, bandwidth=1e9)
