"""tputil.course.trace: each collective of the tensor-parallel GPT is attributed to the module that issued it."""

import pytest
import torch

from tp_helpers import make_gpt
from tputil.comm import SingleGroup, run_threads
from tputil.course.trace import trace_collectives
from tputil.tp_model import TPGPT

B, T = 2, 8


def traced(p, *, backward=True, extra=False):
    dense = make_gpt()
    idx, targets = torch.randint(0, 64, (B, T)), torch.randint(0, 64, (B, T))

    def fn(group):
        model = TPGPT.from_dense(dense, group=group)
        with trace_collectives(model, group, backward=backward) as trace:
            _, loss = model(idx, targets)
            if backward:
                loss.backward()
            if extra:
                group.all_reduce(torch.ones(3), tag="outside")
        hooks = sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
            for m in model.modules()
        )
        return trace, hooks

    return dense.config, run_threads(fn, p)


@pytest.mark.parametrize("p", [2, 3])
def test_forward_all_reduces_belong_to_the_row_parallel_layers(p):
    config, results = traced(p)
    for trace, hooks in results:
        assert hooks == 0  # removed when the block ended
        fwd = trace.collectives("forward")
        expected = [f"transformer.h.{i}.{part}.c_proj" for i in range(config.n_layer) for part in ("attn", "mlp")]
        assert [name for name, _ in fwd] == expected
        assert all(r.kind == "all_reduce" and r.shape == (B, T, config.n_embd) for _, r in fwd)
        bwd = trace.collectives("backward")  # the f in front of each column-parallel layer, last layer first
        expected = [
            f"transformer.h.{i}.{name}" for i in reversed(range(config.n_layer)) for name in ("mlp.c_fc", "attn.c_attn")
        ]
        assert [name for name, _ in bwd] == expected
        assert all(r.tag == "copy_to_parallel_region.backward" for _, r in bwd)
        assert trace.unattributed == []


def test_output_shapes_show_what_is_sharded():
    config, results = traced(4, backward=False)
    trace, _ = results[0]
    shapes = {c.module: c.shape for c in trace.modules("forward", "transformer.h.0.")}
    C = config.n_embd
    assert shapes["transformer.h.0.attn.c_attn"] == (B, T, 3 * C // 4)
    assert shapes["transformer.h.0.mlp.c_fc"] == (B, T, 4 * C // 4)
    assert shapes["transformer.h.0.attn.c_proj"] == shapes["transformer.h.0.ln_1"] == (B, T, C)
    assert trace.modules("backward") == []


def test_a_collective_outside_every_module_is_unattributed():
    _, results = traced(2, backward=False, extra=True)
    trace, _ = results[0]
    assert [r.tag for r in trace.unattributed] == ["outside"]


def test_the_dense_model_at_p_1_records_modules_and_no_collectives():
    dense = make_gpt()
    with trace_collectives(dense, SingleGroup()) as trace:
        dense(torch.randint(0, 64, (B, T)))
    assert trace.collectives() == []
    assert trace.modules()[0].module == "transformer.wte"
    assert trace.modules()[-1].module == "lm_head" and trace.modules()[-1].shape == (B, T, 64)
