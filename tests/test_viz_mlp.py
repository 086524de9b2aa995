"""Smoke tests for tputil.viz.mlp (chapter 4): the figure is drawn from real shards and has the right parts."""

import pytest
import torch
from matplotlib.figure import Figure

from tputil.model import MLP, GPTConfig
from tputil.viz.mlp import draw_tp_mlp


def _patches(fig: Figure) -> dict:
    return {patch.get_gid(): patch for ax in fig.axes for patch in ax.patches if patch.get_gid()}


def _mlp_and_input(n_embd=48):
    torch.manual_seed(0)
    return MLP(GPTConfig(n_embd=n_embd, n_head=1)), torch.randn(2, 8, n_embd)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_columns_split_draws_each_ranks_shards_to_scale_and_one_all_reduce(p):
    mlp, x = _mlp_and_input()
    fig = draw_tp_mlp(mlp, x, p, title="t")
    patches = _patches(fig)
    bars = [g for g in patches if g.startswith("all-reduce")]
    assert bars == ["all-reduce-1"]
    for r in range(p):
        for kind in ("x", "c_fc", "hidden", "c_proj", "partial", "y"):
            assert f"{kind}-device{r}" in patches
        # one unit per element: c_fc's shard A_r is (C, 4C/p), c_proj's B_r is (4C/p, C)
        a, b = patches[f"c_fc-device{r}"], patches[f"c_proj-device{r}"]
        assert (a.get_height(), a.get_width()) == (48, 192 // p)
        assert (b.get_height(), b.get_width()) == (192 // p, 48)
        assert (patches[f"hidden-device{r}"].get_height(), patches[f"hidden-device{r}"].get_width()) == (16, 192 // p)
    assert not any(g.endswith(f"device{p}") for g in patches)
    fig.canvas.draw()  # renders without error


def test_rows_split_draws_the_extra_all_reduce_before_the_gelu():
    mlp, x = _mlp_and_input()
    patches = _patches(draw_tp_mlp(mlp, x, 2, split="rows"))
    assert sorted(g for g in patches if g.startswith("all-reduce")) == ["all-reduce-1", "all-reduce-2"]
    pre = patches["pre-activation-device1"]  # a partial sum of the full (B*T, 4C) pre-activation
    assert (pre.get_height(), pre.get_width()) == (16, 192)
    assert (patches["c_fc-device0"].get_height(), patches["c_fc-device0"].get_width()) == (24, 192)


def test_draw_tp_mlp_rejects_an_unknown_split_and_a_degree_that_does_not_divide():
    mlp, x = _mlp_and_input()
    with pytest.raises(ValueError, match="split='diagonal'"):
        draw_tp_mlp(mlp, x, 2, split="diagonal")
    with pytest.raises(ValueError, match="not divisible"):
        draw_tp_mlp(mlp, x, 5)
