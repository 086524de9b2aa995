"""Smoke tests for tputil.viz: each figure is built from real tensors and has the right parts."""

import pytest
import torch
from matplotlib.figure import Figure

from tputil import viz


def _gids(fig: Figure) -> list[str]:
    return [patch.get_gid() for ax in fig.axes for patch in ax.patches if patch.get_gid()]


@pytest.mark.parametrize("p", [1, 2, 3, 6])
def test_draw_partial_sums_has_two_boxes_per_device_and_one_all_reduce(p):
    partials = [torch.tensor([float(r), 1.0]) for r in range(p)]
    fig = viz.draw_partial_sums(partials, terms=[f"term {r}" for r in range(p)], title="t")
    assert isinstance(fig, Figure)
    gids = _gids(fig)
    assert sorted(g for g in gids if g.endswith("-before")) == sorted(f"device{r}-before" for r in range(p))
    assert sorted(g for g in gids if g.endswith("-after")) == sorted(f"device{r}-after" for r in range(p))
    assert gids.count("all-reduce") == 1
    fig.canvas.draw()  # the figure renders without error


def test_draw_partial_sums_shows_the_all_reduced_total_on_every_device():
    # The toy of chapter 1: z = x1 + x2 = [4, 6] on device 0, y = x3 + x4 = [12, 14] on device 1.
    fig = viz.draw_partial_sums([torch.tensor([4.0, 6.0]), torch.tensor([12.0, 14.0])])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("= [16, 20]") == 2  # one per device, after the all-reduce
    assert "= [4, 6]" in texts and "= [12, 14]" in texts


def test_draw_partial_sums_shows_shapes_of_large_tensors_and_the_result_name():
    fig = viz.draw_partial_sums([torch.ones(4, 6), torch.ones(4, 6)], result="Y = XA")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("shape (4, 6)") == 4  # two partials, two totals
    assert texts.count("Y = XA") == 2


def test_draw_partial_sums_rejects_a_wrong_number_of_terms():
    with pytest.raises(ValueError, match=r"2 partial sums but 3 terms"):
        viz.draw_partial_sums([torch.zeros(1), torch.zeros(1)], terms=["a", "b", "c"])


def test_draw_partial_sums_rejects_an_empty_list():
    with pytest.raises(ValueError, match=r"empty list"):
        viz.draw_partial_sums([])


def test_format_values():
    assert viz.format_values(torch.tensor([4.0, 6.0])) == "[4, 6]"
    assert viz.format_values(torch.tensor(7.0)) == "7"
    assert viz.format_values(torch.tensor([0.125, 2.5])) == "[0.125, 2.5]"
    assert viz.format_values(torch.zeros(3, 4)) == "shape (3, 4)"
