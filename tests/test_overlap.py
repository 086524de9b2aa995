"""Overlap as an option of the layers: `async_grad_all_reduce` equals the plain model, and overlaps for real.

With the option a column-parallel layer's backward starts the all-reduce of dL/dX asynchronously
and computes dL/dW and dL/db while it travels. What must hold: the same outputs and gradients as
the plain layer and model (FLOAT32, see tp_helpers: the fused backward multiplies through matmuls
of other shapes, which some kernels round differently), the same collectives (kinds, shapes,
bytes, tags, in order); on `run_threads` the all-reduces run synchronously; on two real gloo
processes (`DistGroup`) they are started asynchronously.
"""

import pytest
import torch

from tp_helpers import FLOAT32, make_gpt
from tputil.comm import SingleGroup, run_threads
from tputil.launch import run_processes
from tputil.layers import ColumnParallelLinear
from tputil.tp_model import TPGPT, VocabParallelTPGPT

B, T = 2, 16


def calls_of(log):
    return [(r.kind, r.shape, r.dtype, r.nbytes, r.tag) for r in log]


def step(group, dense, cls, idx, targets, overlap):
    """Forward, backward: (logits, loss, gradients by name, the records of forward and of backward)."""
    model = cls.from_dense(dense, group=group, async_grad_all_reduce=overlap)
    with group.stats.measure() as fwd:
        logits, loss = model(idx, targets)
    with group.stats.measure() as bwd:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads, list(fwd.log), list(bwd.log)


def plain_and_overlapped(group, dense, cls, idx, targets):
    return step(group, dense, cls, idx, targets, False), step(group, dense, cls, idx, targets, True)


def check_equal(plain, overlapped, n_layer, vocab, p):
    torch.testing.assert_close(overlapped[0], plain[0], **FLOAT32)
    torch.testing.assert_close(overlapped[1], plain[1], **FLOAT32)
    assert overlapped[2].keys() == plain[2].keys()
    for name in plain[2]:
        torch.testing.assert_close(overlapped[2][name], plain[2][name], **FLOAT32, msg=name)
    assert calls_of(overlapped[3]) == calls_of(plain[3])  # forward unchanged
    assert calls_of(overlapped[4]) == calls_of(plain[4])  # backward: the same all-reduces, f's tag
    backward = [r for r in overlapped[4] if r.tag == "copy_to_parallel_region.backward"]
    assert len(backward) == (0 if p == 1 else 2 * n_layer + vocab)  # c_attn, c_fc per layer (+ lm_head)
    return backward


@pytest.mark.parametrize("cls", [TPGPT, VocabParallelTPGPT])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_the_option_equals_the_plain_model_on_threads(cls, p):
    dense = make_gpt()  # n_head 12, every bias and norm random
    idx, targets = torch.randint(0, 64, (B, T)), torch.randint(0, 64, (B, T))
    for plain, overlapped in run_threads(plain_and_overlapped, p, dense, cls, idx, targets):
        backward = check_equal(plain, overlapped, dense.config.n_layer, cls is VocabParallelTPGPT, p)
        assert not any(r.asynchronous for r in backward)  # threads: synchronous all-reduces


def column_layer(group, dense, x, grad_out, overlap, *, gather_output, stride, x_grad, w_grad):
    layer = ColumnParallelLinear.from_dense(
        dense, group=group, gather_output=gather_output, stride=stride, async_grad_all_reduce=overlap
    )
    layer.weight.requires_grad_(w_grad)
    x = x.clone().requires_grad_(x_grad)
    with group.stats.measure() as m:
        y = layer(x)
        g = grad_out if gather_output else grad_out.chunk(group.world_size, dim=-1)[group.rank]
        if stride > 1 and not gather_output:
            g = torch.cat([c.chunk(group.world_size, dim=-1)[group.rank] for c in grad_out.chunk(stride, dim=-1)], -1)
        y.backward(g)
    grads = [x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad]
    return y.detach(), grads, calls_of(m.log)


@pytest.mark.parametrize(
    "bias, gather_output, stride", [(True, False, 1), (False, True, 1), (True, True, 3), (True, False, 3)]
)
@pytest.mark.parametrize("x_grad, w_grad", [(True, True), (False, True), (True, False)])
def test_the_layer_option_gives_the_plain_layers_outputs_gradients_and_calls(
    bias, gather_output, stride, x_grad, w_grad
):
    torch.manual_seed(0)
    dense = torch.nn.Linear(12, 24, bias=bias)
    x, grad_out = torch.randn(2, 5, 12), torch.randn(2, 5, 24)

    def fn(group):
        kwargs = dict(gather_output=gather_output, stride=stride, x_grad=x_grad, w_grad=w_grad)
        return (
            column_layer(group, dense, x, grad_out, False, **kwargs),
            column_layer(group, dense, x, grad_out, True, **kwargs),
        )

    for plain, overlapped in run_threads(fn, 2):
        torch.testing.assert_close(overlapped[0], plain[0], **FLOAT32)
        for got, want in zip(overlapped[1], plain[1]):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, **FLOAT32)
        assert overlapped[2] == plain[2]
        # dL/dX is all-reduced only when X needs a gradient
        assert sum(c[4] == "copy_to_parallel_region.backward" for c in overlapped[2]) == int(x_grad)


def test_the_option_is_set_on_every_column_parallel_layer_and_shown():
    dense = make_gpt()

    def fn(group):
        model = VocabParallelTPGPT.from_dense(dense, group=group, async_grad_all_reduce=True)
        plain = TPGPT.from_dense(dense, group=group)
        return (
            {n for n, m in model.named_modules() if getattr(m, "async_grad_all_reduce", False)},
            {n for n, m in plain.named_modules() if getattr(m, "async_grad_all_reduce", False)},
            repr(model.lm_head),
            repr(plain.transformer.h[0].mlp.c_fc),
        )

    on, off, shown, not_shown = run_threads(fn, 2)[0]
    n_layer = dense.config.n_layer
    columns = {f"transformer.h.{i}.{name}" for i in range(n_layer) for name in ("attn.c_attn", "mlp.c_fc")}
    assert on == {""} | columns | {"lm_head"}  # "": the model itself
    assert off == set()
    assert "async_grad_all_reduce=True" in shown and "async_grad_all_reduce" not in not_shown


def test_on_one_rank_the_option_is_the_dense_layer():
    torch.manual_seed(0)
    dense = torch.nn.Linear(6, 4)
    layer = ColumnParallelLinear.from_dense(dense, group=SingleGroup(), async_grad_all_reduce=True)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), dense(x))


def overlapped_on_gloo(group, dense, idx, targets):
    return plain_and_overlapped(group, dense, VocabParallelTPGPT, idx, targets)


@pytest.mark.slow
def test_on_two_real_processes_the_all_reduces_of_dl_dx_are_started_asynchronously():
    dense = make_gpt()
    idx, targets = torch.randint(0, 64, (B, T)), torch.randint(0, 64, (B, T))
    for plain, overlapped in run_processes(overlapped_on_gloo, 2, dense, idx, targets, backend="gloo", timeout=120.0):
        backward = check_equal(plain, overlapped, dense.config.n_layer, True, 2)
        assert all(r.asynchronous for r in backward)  # DistGroup: started with async_op=True, waited later
        assert not any(r.asynchronous for r in plain[4])  # the plain model's f: synchronous
