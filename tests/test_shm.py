"""ShmGroup: all-reduces through shared memory between real processes, checked against gloo's.

The rank functions live at module level so that the spawned children can import them. Each run
costs seconds (the children import torch), so one run checks many things. "Nothing left behind"
(conftest's `no_leftover_shm`) covers the processes and the shared-memory files in /dev/shm.
"""

import os
import random
import time
from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tp_helpers import FLOAT32, make_gpt
from tputil.comm import DistGroup, RankError, ShmGroup
from tputil.course import ch08_real_processes as launch_demos
from tputil.launch import run_processes
from tputil.tp_model import TPGPT

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.int64)


def _inputs(rank, n_calls=40, seed=0):
    """The same list of (tensor, op) calls on every rank, with this rank's values."""
    plan = random.Random(seed)
    g = torch.Generator().manual_seed(1000 + rank)
    calls = []
    for _ in range(n_calls):
        dtype, op = plan.choice(DTYPES), plan.choice(["sum", "sum", "max", "min"])
        shape = plan.choice([(1,), (7, 3), (2, 64, 48), (40_000,)])
        x = torch.randn(shape, generator=g) * 100
        calls.append((x.to(dtype), op))
    return calls


def compare_with_gloo(group, capacity_bytes, ordered_stores=None):
    """Every call through ShmGroup and through plain gloo (DistGroup on the same processes)."""
    shm = ShmGroup(group.process_group, capacity_bytes=capacity_bytes, timeout=20.0, ordered_stores=ordered_stores)
    gloo = DistGroup(group.process_group)
    skew = random.Random(group.rank)
    same_as_gloo, same_as_rank_order, untouched = [], [], []
    for x, op in _inputs(group.rank):
        time.sleep(skew.random() * 2e-3)  # the ranks arrive in changing order
        before, n_shm = x.clone(), shm._seq
        got = shm.all_reduce(x, op=op)
        took_shm = shm._seq > n_shm
        untouched.append(torch.equal(x, before))
        want = gloo.all_reduce(x, op=op)
        # gloo adds p > 2 ranks in an order of its own: the same bits only up to float rounding
        exact = not took_shm or group.world_size == 2 or op != "sum" or not x.is_floating_point()
        ulps = 4 * torch.finfo(x.dtype).eps * 300 if x.is_floating_point() else 0  # |sums| < 300 here
        same_as_gloo.append(
            torch.equal(got, want) if exact else torch.allclose(got.double(), want.double(), rtol=0, atol=ulps)
        )
        parts = gloo.all_gather(x.unsqueeze(0), dim=0)  # (p, ...) every rank's input, in rank order
        ordered = parts[0].clone()
        for part in parts[1:]:
            ordered = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[op](ordered, part)
        same_as_rank_order.append(not took_shm or torch.equal(got, ordered))
        same_as_rank_order[-1] &= got.dtype == x.dtype and got.shape == x.shape
    return dict(
        same_as_gloo=same_as_gloo,
        same_as_rank_order=same_as_rank_order,
        untouched=untouched,
        shm_calls=shm._seq,
        counted=dict(shm.stats.calls),
        counted_bytes=dict(shm.stats.bytes),
        gloo_counted=dict(gloo.stats.calls),
        ordered_stores=shm.ordered_stores,
    )


def tp_gpt_shm_and_gloo(group, dense, idx, targets):
    """The TP GPT's forward and backward on ShmGroup and on gloo: logits, loss, gradients and counts."""
    out = {}
    shm = ShmGroup(group.process_group, timeout=20.0)
    for name, g, overlap in (
        ("shm", shm, False),
        ("gloo", DistGroup(group.process_group), False),
        ("overlapped", shm, True),
    ):
        model = TPGPT.from_dense(dense, group=g, async_grad_all_reduce=overlap)
        before = shm._seq
        with g.stats.measure() as m:
            logits, loss = model(idx, targets)
            loss.backward()
        out[name] = dict(
            logits=logits.detach(),
            loss=loss.detach(),
            calls=dict(m.calls),
            bytes=dict(m.bytes),
            grads=[p.grad for p in model.parameters()],
            shm_calls=shm._seq - before,
            asynchronous=[r.asynchronous for r in m.log],
        )
    handle = shm.all_reduce(torch.ones(3), async_op=True)  # ShmGroup: synchronous, a completed handle
    out["handle"] = (handle.is_completed(), handle.wait(), shm.stats.log[-1].asynchronous)
    return out


def mismatched_sizes(group):
    ShmGroup(group.process_group, timeout=20.0).all_reduce(torch.ones(3 + group.rank))


def skip_shm_all_reduce(group, bad_rank, then):
    shm = ShmGroup(group.process_group, timeout=1.0)
    if group.rank == bad_rank:
        if then == "sleep":
            time.sleep(60)
        return "skipped"
    return shm.all_reduce(torch.ones(4))


@pytest.mark.slow
@pytest.mark.parametrize("p, ordered_stores", [(2, None), (3, None), (2, False), (3, False)])
def test_shm_all_reduce_matches_gloo_and_rank_order(p, ordered_stores, no_leftover_shm):
    # capacity 64 KiB: the (40000,) float32/float64/int64 calls do not fit and take gloo's path.
    # ordered_stores=False: the barrier that processors other than x86-64 use, tried here.
    results = run_processes(compare_with_gloo, p, 64 * 1024, ordered_stores, backend="gloo", timeout=120.0)
    assert all(out["ordered_stores"] == (ordered_stores is None) for out in results)  # x86-64 here
    calls = _inputs(0)
    fits = sum(x.numel() * x.element_size() <= 64 * 1024 for x, _ in calls)
    assert 0 < fits < len(calls)  # both paths were taken
    for out in results:
        assert all(out["same_as_rank_order"]), out["same_as_rank_order"]
        assert all(out["same_as_gloo"]), out["same_as_gloo"]  # bitwise at p = 2, and for max, min, integers
        assert all(out["untouched"])
        assert out["shm_calls"] == fits
        assert out["counted"] == {"all_reduce": len(calls)} and out["gloo_counted"]["all_reduce"] == len(calls)
        assert out["counted_bytes"] == {"all_reduce": sum(x.numel() * x.element_size() for x, _ in calls)}


@pytest.mark.slow
def test_tp_gpt_on_shm_equals_gloo_bit_for_bit(no_leftover_shm):
    dense = make_gpt()
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    for out in run_processes(tp_gpt_shm_and_gloo, 2, dense, idx, targets, backend="gloo", timeout=120.0):
        shm, gloo = out["shm"], out["gloo"]
        assert torch.equal(shm["logits"], gloo["logits"]) and torch.equal(shm["loss"], gloo["loss"])
        assert all(torch.equal(a, b) for a, b in zip(shm["grads"], gloo["grads"]))
        assert shm["calls"] == gloo["calls"] == {"all_reduce": 4 * dense.config.n_layer}
        assert shm["bytes"] == gloo["bytes"]
        # the backward-overlap option on a ShmGroup: the same results, every all-reduce through shared memory
        overlapped = out["overlapped"]
        assert torch.equal(overlapped["logits"], shm["logits"])
        torch.testing.assert_close(overlapped["loss"], shm["loss"], **FLOAT32)
        for a, b in zip(overlapped["grads"], shm["grads"]):
            torch.testing.assert_close(a, b, **FLOAT32)
        assert overlapped["calls"] == shm["calls"] and overlapped["bytes"] == shm["bytes"]
        assert overlapped["shm_calls"] == shm["shm_calls"] == 4 * dense.config.n_layer
        assert not any(overlapped["asynchronous"])
        assert out["handle"][0] and torch.equal(out["handle"][1], torch.full((3,), 2.0)) and not out["handle"][2]


@pytest.mark.slow
def test_run_processes_hands_out_shm_groups(no_leftover_shm):
    out = run_processes(compare_with_gloo, 2, 1 << 20, backend="gloo", timeout=120.0, shm=True)
    assert all(all(r["same_as_rank_order"]) for r in out)


@pytest.mark.slow
def test_mismatched_sizes_fail_at_once_naming_both_ranks(no_leftover_shm):
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_processes(mismatched_sizes, 2, backend="gloo", timeout=60.0, collective_timeout=30.0)
    assert time.monotonic() - start < 25  # not the collective timeout
    text = str(info.value)
    assert "rank 0: 3 x torch.float32 (sum); rank 1: 4 x torch.float32 (sum)" in text
    assert "same collectives, in the same order, with the same shapes" in text


@pytest.mark.slow
@pytest.mark.parametrize("then", ["sleep", "return"])
def test_a_skipped_shm_all_reduce_times_out_naming_the_missing_rank(then, no_leftover_shm):
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_processes(skip_shm_all_reduce, 2, 1, then, backend="gloo", timeout=60.0, collective_timeout=1.0)
    assert time.monotonic() - start < 25
    assert "ShmGroup all_reduce #1 on rank 0 timed out after 1.0s: ranks [1] did not arrive" in str(info.value)


@pytest.fixture
def world_of_one():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_bad_arguments_are_refused_with_what_to_do(world_of_one, no_leftover_shm):
    with pytest.raises(ValueError, match="capacity_bytes=100: it must be a positive multiple of 64"):
        ShmGroup(capacity_bytes=100)
    with pytest.raises(ValueError, match=r"slots=0 must be >= 1 \(2 are needed\) and read_delay=0.0 >= 0"):
        ShmGroup(slots=0)
    with pytest.raises(ValueError, match="read_delay=-1 >= 0"):
        ShmGroup(read_delay=-1)
    assert (ShmGroup(ordered_stores=False).ordered_stores, ShmGroup().slots) == (False, 2)
    with mock.patch("platform.machine", return_value="arm64"):  # may reorder stores: a barrier orders them
        assert ShmGroup().ordered_stores is False
    no_room = OSError(28, "No space left on device")
    with mock.patch("os.posix_fallocate", side_effect=no_room), pytest.raises(ValueError) as info:
        ShmGroup(capacity_bytes=1 << 20)
    assert "has no room for 2.0 MiB (No space left on device): pass a smaller capacity_bytes (now 1048576)" in str(
        info.value
    )  # 2 slots x 1 rank x 1 MiB, and 128 bytes of headers
    alone = ShmGroup()
    x = torch.ones(3)
    assert alone.all_reduce(x) is x and alone.stats.total_calls == 0  # one rank: nothing to reduce


@pytest.mark.slow
@pytest.mark.parametrize("ordered_stores", [None, False])
def test_one_slot_is_not_enough_two_are(ordered_stores, no_leftover_shm):
    # with the barrier of other processors too: a fast rank still overwrites a one-slot buffer
    out = run_processes(launch_demos.shm_slots, 2, (1, 2), 0.2, ordered_stores, backend="gloo", timeout=60.0)
    assert [o[2] for o in out] == [[[3.0] * 4, [30.0] * 4]] * 2  # two slots: right on both ranks
    assert out[0][1] == [[3.0] * 4, [30.0] * 4]
    assert out[1][1] == [[12.0] * 4, [30.0] * 4]  # one slot: the slow reader got rank 0's next tensor


def test_without_posix_fallocate_the_segment_is_sized_by_ftruncate(world_of_one, no_leftover_shm, monkeypatch):
    monkeypatch.delattr(os, "posix_fallocate")  # as on macOS
    shm = ShmGroup(capacity_bytes=1 << 20)
    assert shm._mapped.numel() == 2 * 1 * 8 * 8 + 2 * (1 << 20)  # headers, then 2 slots x 1 rank x 1 MiB
