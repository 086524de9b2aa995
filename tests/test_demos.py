"""Tests for tputil.course.ch02_collectives: the rank functions chapter 2 runs on real processes.

They are SPMD code on a Group, so run_threads checks them quickly for several p; one test spawns
real gloo processes, as the chapter does (a few seconds: each child imports torch).
"""

import pytest
import torch

from tputil.comm import RankError, run_threads
from tputil.course import ch02_collectives as demos, lists
from tputil.launch import run_processes


def per_device(p, n=8):
    return [torch.arange(float(n)) + 10 * r for r in range(p)]


def check_demo(results, xs):
    p = len(xs)
    expected = dict(
        all_reduce=lists.all_reduce(xs),
        all_gather=lists.all_gather(xs),
        reduce_scatter=lists.reduce_scatter(xs),
        broadcast=lists.broadcast(xs),
    )
    for r, out in enumerate(results):
        assert (out["rank"], out["world_size"]) == (r, p)
        for kind, want in expected.items():
            assert torch.equal(out[kind], want[r]), kind
        assert torch.equal(out["rs_then_ag"], out["all_reduce"])  # all-reduce = RS + AG
        assert out["input_untouched"]
        counted = {} if p == 1 else {"all_reduce": 1, "all_gather": 2, "reduce_scatter": 1, "broadcast": 1}
        assert out["calls"] == counted


@pytest.mark.parametrize("p", [1, 2, 4])
def test_collectives_demo_on_threads_matches_the_lists(p):
    xs = per_device(p)
    check_demo(run_threads(demos.collectives_demo, p, xs), xs)


def test_collectives_demo_needs_one_tensor_per_rank():
    with pytest.raises(RankError, match=r"needs one tensor per rank: got 3 for world_size=2"):
        run_threads(demos.collectives_demo, 2, per_device(3))


def test_time_all_reduce_returns_one_time_per_size_the_same_on_every_rank():
    sizes = [4, 64, 1024]
    results = run_threads(demos.time_all_reduce, 2, sizes, reps=2, warmup=1)
    assert results[0] == results[1]  # the slowest rank's time, all-reduced with max
    assert results[0]["nbytes"] == sizes and results[0]["world_size"] == 2
    assert len(results[0]["seconds"]) == 3 and all(s > 0 for s in results[0]["seconds"])


def test_time_all_reduce_rejects_sizes_that_are_not_float32_numbers():
    with pytest.raises(RankError, match=r"size 6 bytes: use a positive multiple of 4"):
        run_threads(demos.time_all_reduce, 2, [6])


@pytest.mark.slow
def test_collectives_tour_on_two_real_processes():
    xs = per_device(2)
    results = run_processes(demos.collectives_tour, 2, xs, [4, 4096], backend="gloo", timeout=120.0)
    check_demo([out["demo"] for out in results], xs)
    assert all(out["backend"] == "gloo" for out in results)
    assert results[0]["timings"] == results[1]["timings"]
    assert results[0]["timings"]["nbytes"] == [4, 4096] and len(results[0]["timings"]["seconds"]) == 2
