"""Column- and row-parallel linear layers against nn.Linear: outputs, input gradients, weight gradients.

picotron-style: build the dense nn.Linear, slice it with from_dense on every rank (run_threads),
run the same input through both, compare. Tolerances are explained in tp_helpers.
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from tp_helpers import FLOAT32, FLOAT64, PROPERTY
from tputil.comm import RankError, SingleGroup, run_threads
from tputil.layers import ColumnParallelLinear, RowParallelLinear
from tputil.shard import shard_tensor


def dense_linear(in_features, out_features, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)  # nonzero bias by default


def dense_run(linear, x, grad_out):
    x = x.clone().requires_grad_()
    y = linear(x)
    y.backward(grad_out)
    return y.detach(), x.grad, linear.weight.grad, None if linear.bias is None else linear.bias.grad


def check_column(
    p,
    in_f,
    out_f,
    *,
    bias=True,
    gather_output=False,
    stride=1,
    async_grad_all_reduce=False,
    dtype=torch.float32,
    tol=FLOAT32,
):
    dense = dense_linear(in_f, out_f, bias, dtype)
    x = torch.randn(2, 5, in_f, dtype=dtype)
    grad_out = torch.randn(2, 5, out_f, dtype=dtype)
    y, dx, dw, db = dense_run(dense, x, grad_out)

    def fn(group):
        layer = ColumnParallelLinear.from_dense(
            dense, group=group, gather_output=gather_output, stride=stride, async_grad_all_reduce=async_grad_all_reduce
        )
        xr = x.clone().requires_grad_()
        yr = layer(xr)
        # the loss is sum(y * grad_out); a rank holding only its columns sees only its part of grad_out
        g = grad_out if gather_output else shard_tensor(grad_out, group.rank, p, -1, stride)
        yr.backward(g)
        return yr.detach(), xr.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad

    for r, (yr, dxr, dwr, dbr) in enumerate(run_threads(fn, p)):
        expected_y = y if gather_output else shard_tensor(y, r, p, -1, stride)
        torch.testing.assert_close(yr, expected_y, **tol)
        torch.testing.assert_close(dxr, dx, **tol)  # complete on every rank: f all-reduced it
        torch.testing.assert_close(dwr, shard_tensor(dw, r, p, 0, stride), **tol)
        if bias:
            torch.testing.assert_close(dbr, shard_tensor(db, r, p, 0, stride), **tol)


def check_row(p, in_f, out_f, *, bias=True, input_is_parallel=True, dtype=torch.float32, tol=FLOAT32):
    dense = dense_linear(in_f, out_f, bias, dtype)
    x = torch.randn(2, 5, in_f, dtype=dtype)
    grad_out = torch.randn(2, 5, out_f, dtype=dtype)
    y, dx, dw, db = dense_run(dense, x, grad_out)

    def fn(group):
        layer = RowParallelLinear.from_dense(dense, group=group, input_is_parallel=input_is_parallel)
        xr = (shard_tensor(x, group.rank, p, -1) if input_is_parallel else x.clone()).requires_grad_()
        yr = layer(xr)
        yr.backward(grad_out)  # the output is replicated: every rank sees the whole grad_out
        return yr.detach(), xr.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad

    for r, (yr, dxr, dwr, dbr) in enumerate(run_threads(fn, p)):
        torch.testing.assert_close(yr, y, **tol)
        torch.testing.assert_close(dxr, shard_tensor(dx, r, p, -1) if input_is_parallel else dx, **tol)
        torch.testing.assert_close(dwr, shard_tensor(dw, r, p, 1), **tol)
        if bias:
            torch.testing.assert_close(dbr, db, **tol)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gather_output", [False, True])
@pytest.mark.parametrize("async_grad_all_reduce", [False, True])
def test_column_parallel_matches_dense(p, bias, gather_output, async_grad_all_reduce):
    check_column(p, 16, 24, bias=bias, gather_output=gather_output, async_grad_all_reduce=async_grad_all_reduce)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("gather_output", [False, True])
@pytest.mark.parametrize("async_grad_all_reduce", [False, True])
def test_column_parallel_with_stride_3_matches_dense(p, gather_output, async_grad_all_reduce):
    check_column(p, 12, 3 * 12, stride=3, gather_output=gather_output, async_grad_all_reduce=async_grad_all_reduce)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_matches_dense(p, bias, input_is_parallel):
    check_row(p, 24, 16, bias=bias, input_is_parallel=input_is_parallel)


@PROPERTY
@given(
    p=st.integers(1, 4),
    in_per=st.integers(1, 4),
    out_per=st.integers(1, 4),
    stride=st.integers(1, 3),
    overlap=st.booleans(),
)
def test_column_parallel_property_float64(p, in_per, out_per, stride, overlap):
    check_column(
        p,
        3 * in_per,
        p * stride * out_per,
        stride=stride,
        async_grad_all_reduce=overlap,
        dtype=torch.float64,
        tol=FLOAT64,
    )


@PROPERTY
@given(p=st.integers(1, 4), in_per=st.integers(1, 4), out_f=st.integers(1, 9), scatter=st.booleans())
def test_row_parallel_property_float64(p, in_per, out_f, scatter):
    check_row(p, p * in_per, out_f, input_is_parallel=not scatter, dtype=torch.float64, tol=FLOAT64)


def test_row_parallel_bias_is_added_once():
    """The negative control: adding the bias on every rank before the reduce would add it p times."""
    p, dense = 3, dense_linear(12, 8)
    x = torch.randn(4, 12)

    def fn(group):
        layer = RowParallelLinear.from_dense(dense, group=group)
        partial = nn.functional.linear(shard_tensor(x, group.rank, p, -1), layer.weight, layer.bias)
        return layer(shard_tensor(x, group.rank, p, -1)), group.all_reduce(partial)

    good, wrong = run_threads(fn, p)[0]
    torch.testing.assert_close(good, dense(x), **FLOAT32)
    torch.testing.assert_close(wrong - good, (p - 1) * dense.bias.expand_as(good).detach(), **FLOAT32)


def test_column_then_row_needs_one_all_reduce_in_forward_and_one_in_backward():
    torch.manual_seed(0)
    first, second = nn.Linear(8, 32), nn.Linear(32, 8)
    x = torch.randn(2, 3, 8)

    def fn(group):
        col = ColumnParallelLinear.from_dense(first, group=group)
        row = RowParallelLinear.from_dense(second, group=group)
        xr = x.clone().requires_grad_()
        with group.stats.measure() as fwd:
            y = row(col(xr))  # (2, 3, 32/p) in between: nothing to communicate
        with group.stats.measure() as bwd:
            y.sum().backward()
        return y.detach(), fwd, bwd

    for y, fwd, bwd in run_threads(fn, 4):
        torch.testing.assert_close(y, second(first(x)).detach(), **FLOAT32)
        assert fwd.calls == {"all_reduce": 1} and fwd.bytes == {"all_reduce": 2 * 3 * 8 * 4}
        assert bwd.calls == {"all_reduce": 1} and bwd.bytes == {"all_reduce": 2 * 3 * 8 * 4}


def test_names_shapes_dtype_and_no_random_numbers_drawn():
    dense = dense_linear(8, 12, dtype=torch.float64)

    def fn(group):
        torch.manual_seed(123)  # in a thread, but from_dense must not draw from the (shared) generator
        before = torch.get_rng_state()
        col = ColumnParallelLinear.from_dense(dense, group=group)
        row = RowParallelLinear.from_dense(dense, group=group, input_is_parallel=False)
        assert torch.equal(before, torch.get_rng_state())
        return col, row

    col, row = run_threads(fn, 2)[1]
    assert list(col.state_dict()) == list(dense.state_dict()) == ["weight", "bias"]
    assert col.weight.shape == (6, 8) and col.bias.shape == (6,) and col.weight.dtype == torch.float64
    assert row.weight.shape == (12, 4) and row.bias.shape == (12,)
    assert "6 on rank 1 of 2" in repr(col)


def test_constructor_slices_one_master_weight_drawn_like_nn_linear():
    """Built directly, every rank draws the same master weight (given the same generator) and slices it."""
    p = 2
    cols = run_threads(lambda g: ColumnParallelLinear(6, 8, group=g, generator=torch.Generator().manual_seed(7)), p)
    rows = run_threads(lambda g: RowParallelLinear(6, 8, group=g, generator=torch.Generator().manual_seed(7)), p)
    master = torch.empty(8, 6).uniform_(-(6**-0.5), 6**-0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.cat([c.weight for c in cols], dim=0), master)
    assert torch.equal(torch.cat([r.weight for r in rows], dim=1), master)
    assert torch.equal(rows[0].bias, rows[1].bias)
    torch.manual_seed(5)
    reference = nn.Linear(6, 8)
    torch.manual_seed(5)
    single = ColumnParallelLinear(6, 8, group=SingleGroup())
    assert torch.equal(single.weight, reference.weight) and torch.equal(single.bias, reference.bias)


def test_indivisible_layouts_are_rejected():
    with pytest.raises(RankError, match=r"out_features / stride=10 is not divisible by p=4"):
        run_threads(lambda g: ColumnParallelLinear(4, 10, group=g), 4)
    with pytest.raises(ValueError, match=r"out_features=10 is not divisible by stride=3"):
        ColumnParallelLinear(4, 10, group=SingleGroup(), stride=3)
    with pytest.raises(RankError, match=r"in_features=6 is not divisible by p=4"):
        run_threads(lambda g: RowParallelLinear(6, 4, group=g), 4)
