"""The collectives on run_threads, their counting and timing, asynchronous handles, the failure modes,
and the f/g autograd pairs.

DistGroup (real torch.distributed) is exercised in test_launch.py, on real processes; its really
asynchronous all-reduce here, on two gloo processes.
"""

import time

import pytest
import torch
from hypothesis import given, strategies as st

from tp_helpers import PROPERTY
from tputil.comm import (
    CollectiveError,
    Handle,
    RankError,
    SingleGroup,
    copy_to_parallel_region,
    gather_from_parallel_region,
    reduce_from_parallel_region,
    run_threads,
    scatter_to_parallel_region,
)
from tputil.launch import run_processes


def inputs(p, shape=(2, 6), seed=0):
    """Rank r's input: a different random tensor per rank."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(p)]


def rank_order_sum(ts):
    total = ts[0].clone()
    for t in ts[1:]:
        total = total + t
    return total


# ---------------------------------------------------------------------------- what each computes


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_collectives_compute_what_they_promise(p):
    xs = inputs(p, shape=(3, 12))

    def fn(group):
        x = xs[group.rank]
        before = x.clone()
        out = dict(
            all_reduce=group.all_reduce(x),
            all_reduce_max=group.all_reduce(x, op="max"),
            all_gather=group.all_gather(x, dim=-1),
            all_gather0=group.all_gather(x, dim=0),
            reduce_scatter=group.reduce_scatter(x, dim=-1),
            broadcast=group.broadcast(x, src=p - 1),
        )
        assert torch.equal(x, before)  # out of place: the input is untouched
        return out

    results = run_threads(fn, p)
    total = rank_order_sum(xs)
    for r, out in enumerate(results):
        assert torch.equal(out["all_reduce"], total)  # bitwise: the same rank-order sum everywhere
        assert torch.equal(out["all_reduce_max"], torch.stack(xs).amax(0))
        assert torch.equal(out["all_gather"], torch.cat(xs, dim=-1))
        assert torch.equal(out["all_gather0"], torch.cat(xs, dim=0))
        assert torch.equal(out["reduce_scatter"], total.chunk(p, dim=-1)[r])
        assert torch.equal(out["broadcast"], xs[p - 1])


@PROPERTY
@given(p=st.integers(1, 4), rows=st.integers(1, 3), per_rank=st.integers(1, 3), seed=st.integers(0, 99))
def test_reduce_scatter_then_all_gather_is_all_reduce(p, rows, per_rank, seed):
    """The identity behind ring all-reduce (chapter 2): all_reduce = all_gather . reduce_scatter."""
    xs = inputs(p, shape=(rows, p * per_rank), seed=seed)
    results = run_threads(lambda g: (g.all_reduce(xs[g.rank]), g.all_gather(g.reduce_scatter(xs[g.rank]))), p)
    for reduced, two_step in results:
        assert torch.equal(reduced, two_step)


# ---------------------------------------------------------------------------- counting


def test_calls_and_bytes_are_counted_per_kind():
    x = torch.zeros(4, 6)  # 24 float32 numbers = 96 bytes

    def fn(group):
        group.all_reduce(x, tag="first")
        group.all_reduce(x.double())
        with group.stats.measure() as region:
            group.all_gather(x[:, :3])
            group.reduce_scatter(x)
            with group.stats.measure() as inner:
                group.broadcast(x)
        return group.stats, region, inner

    for stats, region, inner in run_threads(fn, 2):
        assert stats.calls == {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "broadcast": 1}
        assert stats.bytes == {"all_reduce": 96 + 192, "all_gather": 48, "reduce_scatter": 96, "broadcast": 96}
        assert region.calls == {"all_gather": 1, "reduce_scatter": 1, "broadcast": 1}
        assert inner.calls == {"broadcast": 1} and inner.total_bytes == 96
        assert stats.total_calls == 5
        first = stats.log[0]
        assert (first.kind, first.shape, first.dtype, first.nbytes, first.tag) == (
            "all_reduce",
            (4, 6),
            torch.float32,
            96,
            "first",
        )
        assert stats.log[1].dtype == torch.float64


def test_one_rank_is_the_identity_and_communicates_nothing():
    group = SingleGroup()
    x = torch.randn(2, 4)
    for op in (group.all_reduce, group.all_gather, group.reduce_scatter, group.broadcast):
        assert op(x) is x
    assert group.stats.total_calls == 0 and group.stats.log == []


def test_reduce_scatter_needs_equal_chunks():
    with pytest.raises(RankError, match=r"dim 1 of shape \(2, 5\) has size 5, not divisible into p=2"):
        run_threads(lambda g: g.reduce_scatter(torch.zeros(2, 5)), 2)


# ---------------------------------------------------------------------------- async_op and timing


def four_collectives(group, x, **kwargs):
    return [
        group.all_reduce(x, **kwargs),
        group.all_gather(x, **kwargs),
        group.reduce_scatter(x, **kwargs),
        group.broadcast(x, src=group.world_size - 1, **kwargs),
    ]


@pytest.mark.parametrize("p", [2, 3])
def test_async_op_on_threads_returns_completed_handles_with_the_same_results_counted_once(p):
    xs = inputs(p, shape=(2, 6))

    def fn(group):
        x = xs[group.rank]
        with group.stats.measure() as sync:
            plain = four_collectives(group, x)
        with group.stats.measure() as started:
            handles = four_collectives(group, x, async_op=True)
        completed = [h.is_completed() for h in handles]
        results = [h.wait() for h in handles]
        again = [h.wait() for h in handles]
        return plain, handles, completed, results, again, sync, started

    for plain, handles, completed, results, again, sync, started in run_threads(fn, p):
        assert all(isinstance(h, Handle) for h in handles) and all(completed)  # threads: synchronous
        assert all(torch.equal(a, b) for a, b in zip(results, plain))
        assert all(a is b for a, b in zip(again, results))  # wait() again: the same tensor
        assert started.calls == sync.calls == {"all_reduce": 1, "all_gather": 1, "reduce_scatter": 1, "broadcast": 1}
        assert started.bytes == sync.bytes
        assert not any(r.asynchronous for r in started.log)


def test_async_op_on_one_rank_is_a_completed_handle_of_the_input():
    group, x = SingleGroup(), torch.randn(2, 4)
    for handle in four_collectives(group, x, async_op=True):
        assert handle.is_completed() and handle.wait() is x
    assert group.stats.total_calls == 0


def test_calls_are_timed_only_when_asked():
    def fn(group):
        x = torch.ones(4)
        group.all_reduce(x)  # untimed
        with group.stats.measure(timed=True) as timed:
            before = time.perf_counter()
            group.all_reduce(x)
            handle = group.all_gather(x, async_op=True)
            with group.stats.measure() as inner:  # inside a timed region: timed too
                group.broadcast(x)
            after = time.perf_counter()
        handle.wait()
        group.reduce_scatter(x)  # the region has closed: untimed again
        group.stats.timed = True  # or for every call of this group
        group.all_reduce(x)
        return group.stats.log, timed.log, inner.log, before, after

    for log, timed, inner, before, after in run_threads(fn, 2):
        assert [r.kind for r in timed] == ["all_reduce", "all_gather", "broadcast"]
        assert timed == log[1:4] and inner == log[3:4]  # the same records, seen by every region
        for record in timed:
            assert before <= record.start and record.seconds >= 0 and record.start + record.seconds <= after
        assert timed[0].start + timed[0].seconds <= timed[1].start  # one after the other
        for record in (log[0], log[4]):
            assert record.start is None and record.seconds is None
        assert log[5].start is not None and log[5].seconds is not None


def async_all_reduce_on_gloo(group):
    """Rank 1 comes late: rank 0's asynchronous all-reduce is still in flight when it returns."""
    x = torch.full((1000,), float(group.rank + 1))
    if group.rank == 1:
        time.sleep(0.5)
    with group.stats.measure(timed=True) as m:
        handle = group.all_reduce(x, async_op=True)
        pending, seconds_before_wait = not handle.is_completed(), m.log[0].seconds
        out = handle.wait()
        same = handle.wait() is out
        gathered = group.all_gather(x, async_op=True)  # synchronous on a DistGroup: completed
    record = m.log[0]
    return dict(
        pending=pending,
        seconds_before_wait=seconds_before_wait,
        out=out,
        same=same,
        untouched=torch.equal(x, torch.full((1000,), float(group.rank + 1))),
        gathered=(gathered.is_completed(), gathered.wait()),
        calls=dict(m.calls),
        asynchronous=[r.asynchronous for r in m.log],
        seconds=record.seconds,
    )


@pytest.mark.slow
def test_dist_group_starts_the_all_reduce_asynchronously_on_real_processes():
    rank0, rank1 = run_processes(async_all_reduce_on_gloo, 2, backend="gloo", timeout=120.0)
    assert rank0["pending"]  # returned before rank 1 had even called it
    assert rank0["seconds_before_wait"] is None  # timed on wait: launch + wait
    assert rank0["seconds"] >= 0.3  # the wait for rank 1 is exposed time
    for out in (rank0, rank1):
        assert torch.equal(out["out"], torch.full((1000,), 3.0)) and out["same"] and out["untouched"]
        assert out["gathered"][0] and torch.equal(
            out["gathered"][1], torch.cat([torch.ones(1000), 2 * torch.ones(1000)])
        )
        assert out["calls"] == {"all_reduce": 1, "all_gather": 1}  # counted once each, when started
        assert out["asynchronous"] == [True, False]


# ---------------------------------------------------------------------------- failure modes


def test_a_rank_that_skips_a_collective_fails_fast():
    def fn(group):
        x = torch.ones(3)
        group.all_reduce(x)
        if group.rank != 1:
            group.all_reduce(x)  # rank 1 returns instead

    start = time.monotonic()
    with pytest.raises(
        RankError,
        match=r"rank 1 returned without calling collective #2 \(all_reduce\), "
        r"which ranks \[[02, ]+\] are waiting in",
    ) as info:
        run_threads(fn, 3, timeout=20.0)
    assert time.monotonic() - start < 5.0  # an error at once, not the 20 s timeout
    # which of ranks 0 and 2 had arrived when rank 1 returned is a race, as on real processes
    assert isinstance(info.value.__cause__, CollectiveError)


def test_mismatched_collectives_are_an_error_naming_each_rank():
    def fn(group):
        x = torch.ones(2, 2)
        return group.all_reduce(x) if group.rank == 0 else group.all_gather(x)

    with pytest.raises(
        RankError,
        match=r"collective #1 does not match across ranks: rank 0 called "
        r"all_reduce\(shape=\(2, 2\).*rank 1 called all_gather\(shape=\(2, 2\)",
    ):
        run_threads(fn, 2)


def test_mismatched_shapes_are_an_error():
    with pytest.raises(
        RankError, match=r"rank 0 called all_reduce\(shape=\(3,\).*rank 1 called all_reduce\(shape=\(4,\)"
    ):
        run_threads(lambda g: g.all_reduce(torch.ones(3 + g.rank)), 2)


def test_a_rank_exception_is_reraised_naming_the_rank_and_others_stop_waiting():
    def fn(group):
        if group.rank == 2:
            raise ValueError("boom on purpose")
        return group.all_reduce(torch.ones(1))  # ranks 0 and 1 wait for rank 2

    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 2 of 3 failed: ValueError: boom on purpose") as info:
        run_threads(fn, 3, timeout=20.0)
    assert time.monotonic() - start < 5.0
    assert info.value.rank == 2
    assert isinstance(info.value.__cause__, ValueError)  # the original traceback is chained


def test_timeout_is_the_last_resort():
    def fn(group):
        if group.rank == 1:
            time.sleep(1.0)  # arrives long after rank 0 gave up
        return group.all_reduce(torch.ones(1))

    with pytest.raises(
        RankError,
        match=r"rank 0 of 2 failed: CollectiveError: timed out after 0.2s in collective "
        r"#1 \(all_reduce\): ranks \[0\] are waiting, ranks \[1\] never arrived",
    ):
        run_threads(fn, 2, timeout=0.2)


def test_run_threads_passes_args_and_grad_mode():
    def fn(group, a, *, b):
        return group.rank, a + b, torch.is_grad_enabled()

    assert run_threads(fn, 2, 1, b=2) == [(0, 3, True), (1, 3, True)]
    with torch.no_grad():
        assert run_threads(fn, 2, 1, b=2)[1][2] is False


# ---------------------------------------------------------------------------- the autograd pairs


def grads_for(p, shape, seed=1):
    """Rank r's upstream gradient dL/dy: different on every rank."""
    return inputs(p, shape=shape, seed=seed)


@pytest.mark.parametrize("p", [2, 3])
def test_f_copy_to_parallel_region(p):
    """f: forward identity, backward all-reduce."""
    x0, gs = torch.randn(2, 6), grads_for(p, (2, 6))

    def fn(group):
        x = x0.clone().requires_grad_()
        with group.stats.measure() as fwd:
            y = copy_to_parallel_region(x, group)
        with group.stats.measure() as bwd:
            y.backward(gs[group.rank])
        return y.detach(), x.grad, fwd.calls, bwd.calls

    for y, grad, fwd, bwd in run_threads(fn, p):
        assert torch.equal(y, x0)
        assert torch.equal(grad, rank_order_sum(gs))
        assert fwd == {} and bwd == {"all_reduce": 1}


@pytest.mark.parametrize("p", [2, 3])
def test_g_reduce_from_parallel_region(p):
    """g: forward all-reduce, backward identity."""
    xs, gs = inputs(p, (2, 6)), grads_for(p, (2, 6))

    def fn(group):
        x = xs[group.rank].clone().requires_grad_()
        with group.stats.measure() as fwd:
            y = reduce_from_parallel_region(x, group)
        with group.stats.measure() as bwd:
            y.backward(gs[group.rank])
        return y.detach(), x.grad, fwd.calls, bwd.calls

    for r, (y, grad, fwd, bwd) in enumerate(run_threads(fn, p)):
        assert torch.equal(y, rank_order_sum(xs))
        assert torch.equal(grad, gs[r])
        assert fwd == {"all_reduce": 1} and bwd == {}


@pytest.mark.parametrize("p", [2, 3])
def test_gather_from_parallel_region(p):
    """Forward all-gather on the last dim, backward keep this rank's chunk."""
    xs, gs = inputs(p, (2, 4)), grads_for(p, (2, 4 * p))

    def fn(group):
        x = xs[group.rank].clone().requires_grad_()
        y = gather_from_parallel_region(x, group)
        with group.stats.measure() as bwd:
            y.backward(gs[group.rank])
        return y.detach(), x.grad, bwd.calls

    for r, (y, grad, bwd) in enumerate(run_threads(fn, p)):
        assert torch.equal(y, torch.cat(xs, dim=-1))
        assert torch.equal(grad, gs[r].chunk(p, dim=-1)[r])
        assert bwd == {}


@pytest.mark.parametrize("p", [2, 3])
def test_scatter_to_parallel_region(p):
    """Forward keep this rank's chunk of the last dim, backward all-gather."""
    x0, gs = torch.randn(2, 4 * p), grads_for(p, (2, 4))

    def fn(group):
        x = x0.clone().requires_grad_()
        with group.stats.measure() as fwd:
            y = scatter_to_parallel_region(x, group)
        y.backward(gs[group.rank])
        return y.detach(), x.grad, fwd.calls

    for r, (y, grad, fwd) in enumerate(run_threads(fn, p)):
        assert torch.equal(y, x0.chunk(p, dim=-1)[r])
        assert torch.equal(grad, torch.cat(gs, dim=-1))
        assert fwd == {}


def test_pairs_are_the_identity_on_one_rank():
    group, x = SingleGroup(), torch.randn(3, 4, requires_grad=True)
    for op in (
        copy_to_parallel_region,
        reduce_from_parallel_region,
        gather_from_parallel_region,
        scatter_to_parallel_region,
    ):
        assert op(x, group) is x
