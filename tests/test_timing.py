"""tputil.bench.timing: whole runs timed one way, the slowest rank's median, the same on every rank."""

import time

import pytest
import torch

from tputil.bench.timing import line_up, seconds, slowest_rank_seconds
from tputil.comm import RankError, SingleGroup, run_threads


def test_the_slowest_rank_sets_the_time_and_every_rank_gets_it():
    def fn(group):
        calls = []

        def run():
            calls.append(1)
            if group.rank == 1:
                time.sleep(0.02)  # rank 1 is the slow one

        with group.stats.measure() as m:
            result = slowest_rank_seconds(run, group, reps=3, warmup=2)
        return result, len(calls), dict(m.calls)

    (fast, n0, calls0), (slow, n1, calls1) = run_threads(fn, 2)
    assert fast == slow >= 0.02  # rank 0's own runs took microseconds
    assert n0 == n1 == 5  # warmup + reps
    assert calls0 == calls1 == {"all_reduce": 6}  # per rep: one to line up, one for the max


def test_alone_it_is_the_median_of_this_process():
    durations = iter([0.0, 0.03, 0.001, 0.002])  # the first is the warmup; median of the rest: 2 ms

    def run():
        time.sleep(next(durations))

    assert 0.002 <= slowest_rank_seconds(run, reps=3, warmup=1) < 0.03
    assert slowest_rank_seconds(lambda: None, SingleGroup(), reps=1, warmup=0) >= 0


def test_bad_reps_or_warmup_are_refused():
    with pytest.raises(ValueError, match="reps=0 must be >= 1 and warmup=0 >= 0"):
        slowest_rank_seconds(lambda: None, reps=0, warmup=0)
    with pytest.raises(ValueError, match="warmup=-1 >= 0"):
        slowest_rank_seconds(lambda: None, reps=1, warmup=-1)


def test_line_up_waits_for_every_rank_and_seconds_returns_the_result():
    def fn(group):
        if group.rank == 0:
            time.sleep(0.2)
        line_up(group)
        return time.perf_counter()

    arrived = run_threads(fn, 3)
    assert max(arrived) - min(arrived) < 0.15  # nobody left before rank 0 came (0.2 s late)
    line_up(SingleGroup())  # one rank: nothing to wait for
    line_up(None)
    elapsed, result = seconds(lambda: torch.ones(2).sum())
    assert elapsed >= 0 and result.item() == 2.0


def test_a_rank_that_skips_the_timing_is_an_error_not_a_hang():
    def fn(group):
        if group.rank == 0:
            return slowest_rank_seconds(lambda: None, group, reps=1, warmup=0)
        return None

    with pytest.raises(RankError, match="returned without calling collective #1"):
        run_threads(fn, 2, timeout=10.0)
