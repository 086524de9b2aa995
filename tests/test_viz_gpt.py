"""Smoke tests for tputil.viz.gpt: the figures are drawn from real traces and the plan, with the right parts."""

import pytest
import torch
from matplotlib.figure import Figure

from tp_helpers import make_gpt
from tputil.comm import SingleGroup, run_threads
from tputil.course.trace import trace_collectives
from tputil.model import GPTConfig
from tputil.tp_model import TPGPT
from tputil.viz import gpt as viz_gpt


def _gids(fig):
    return [patch.get_gid() for ax in fig.axes for patch in ax.patches if patch.get_gid()]


def test_index_runs():
    assert viz_gpt.index_runs([0, 1, 2, 8, 9]) == [(0, 3), (8, 10)]
    assert viz_gpt.index_runs([]) == []


@pytest.mark.parametrize("p", [2, 4])
def test_block_figure_has_a_box_per_module_and_rank_and_a_bar_per_collective(p):
    dense = make_gpt()
    idx, targets = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    with trace_collectives(dense, SingleGroup(), backward=False) as dense_trace:
        dense(idx)

    def fn(group):
        model = TPGPT.from_dense(dense, group=group)
        with trace_collectives(model, group) as trace:
            model(idx, targets)[1].backward()
        return trace

    fig = viz_gpt.draw_block_collectives(dense_trace, run_threads(fn, p), layer=1, title="t")
    assert isinstance(fig, Figure)
    gids = _gids(fig)
    modules = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.gelu", "mlp.c_proj"]
    for m in modules:
        assert gids.count(f"dense-transformer.h.1.{m}") == 1
        assert sorted(g for g in gids if g.startswith(f"transformer.h.1.{m}-device")) == [
            f"transformer.h.1.{m}-device{r}" for r in range(p)
        ]
    assert sorted(g for g in gids if g.startswith("forward-")) == ["forward-all_reduce-0", "forward-all_reduce-1"]
    assert sorted(g for g in gids if g.startswith("backward-")) == ["backward-all_reduce-0", "backward-all_reduce-1"]
    fig.canvas.draw()


def test_block_figure_needs_the_layer_in_the_trace():
    dense = make_gpt()
    with trace_collectives(dense, SingleGroup()) as trace:
        dense(torch.randint(0, 64, (1, 4)))
    with pytest.raises(ValueError, match="transformer.h.9."):
        viz_gpt.draw_block_collectives(trace, [trace], layer=9)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_layer_split_cuts_each_parameter_as_the_plan_says(p):
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    fig = viz_gpt.draw_layer_split(config, p, layer=0, title="t")
    gids = _gids(fig)
    prefix = "transformer.h.0."

    def count(name):
        return sum(g.startswith(prefix + name + "-device") for g in gids)

    # c_attn: q, k and v each cut into p runs of rows (for p = 1 the three runs are one block)
    assert count("attn.c_attn.weight") == (1 if p == 1 else 3 * p)
    assert count("mlp.c_fc.weight") == count("mlp.c_fc.bias") == count("mlp.c_proj.weight") == p
    assert count("attn.c_proj.weight") == p
    for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_proj.bias", "mlp.c_proj.bias"):
        assert gids.count(prefix + name + "-replicated") == 1
    fig.canvas.draw()
