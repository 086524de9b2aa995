"""run_processes when things go wrong: each failure is reported promptly, names the rank, and
leaves no process behind.

Every test runs real processes (about 1.5 s each: the children import torch), with small
timeouts. The misbehaving rank functions live in `tputil.course.ch08_real_processes`, which the children
import. "No process left behind" is checked by conftest's `no_leftovers`: the children of this
process (recursively) are the same after the call as before; processes the ranks started themselves
are gone too (they leave our tree when their parent dies, so they are tracked by pid here).
"""

import re
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from tputil import launch
from tputil.comm import RankError
from tputil.course import ch08_real_processes as demos
from tputil.launch import run_processes

SLOW = dict(timeout=60.0, collective_timeout=60.0)  # far above what any test below may take


def _running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie has exited
    except psutil.NoSuchProcess:
        return False


def _gone_within(pids, seconds):
    deadline = time.monotonic() + seconds
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if _running(pid)]


@pytest.mark.slow
def test_two_concurrent_runs_each_get_their_own_port_and_results(no_leftovers, capsys):
    out = {}

    def run(name):
        out[name] = run_processes(demos.hello, 2, f"in run {name}", backend="gloo", **SLOW)

    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in "ab":
        assert [(rank, p, total) for rank, p, _, total in out[name]] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert len({pid for run in out.values() for _, _, pid, _ in run}) == 4  # four different processes
    printed = capsys.readouterr().out.splitlines()  # what the ranks print comes back, tagged
    for name in "ab":
        assert "[rank 0] hello from rank 0 of 2 in run " + name in printed
        assert "[rank 1] hello from rank 1 of 2 in run " + name in printed


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_call_at_once_and_what_the_ranks_started_is_stopped(no_leftovers, tmp_path):
    start = time.monotonic()
    with pytest.raises(
        RankError,
        match=r"^rank 1 of 2 failed:\nTraceback(.|\n)*in raise_on\n(.|\n)*"
        r"ValueError: rank 1 fails on purpose",
    ) as info:
        run_processes(demos.start_process_then_raise, 2, str(tmp_path / "pid"), 1, **SLOW)
    assert info.value.rank == 1
    # rank 1 waits to be stopped after it raised, so rank 0 is still in its all-reduce (see the next test)
    assert "rank 0 was still running and was stopped" in str(info.value)
    assert time.monotonic() - start < 15.0  # rank 0 waited in an all-reduce: it was stopped, not waited for
    # each rank had started a `sleep` process of its own: those leave our process tree when their
    # parent dies (so the fixture cannot see them), so we look them up by pid
    pids = [int((tmp_path / f"pid.{r}").read_text()) for r in range(2)]
    assert _gone_within(pids, 2.0) == []


class _SlowClock:
    """The `time` module as launch.py sees it, with every sleep stretched to at least `nap` seconds."""

    def __init__(self, nap):
        self.nap = nap

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds):
        time.sleep(max(seconds, self.nap))


@pytest.mark.slow
def test_a_rank_waiting_for_one_that_raised_is_reported_as_still_running_however_late_the_parent_looks(
    no_leftovers, tmp_path, monkeypatch
):
    """The rank that raised stays alive until it is stopped, so the ranks waiting for it in a collective
    do not fail in turn ("Connection closed"): the report is the same whenever the parent looks.
    Here the parent looks at its ranks only once a second, long after rank 1 raised."""
    monkeypatch.setattr(launch, "time", _SlowClock(1.0))
    with pytest.raises(
        RankError,
        match=r"^rank 1 of 2 failed:\nTraceback(.|\n)*ValueError: rank 1 fails on purpose"
        r"(.|\n)*The other ranks: rank 0 was still running and was stopped\.$",
    ):
        run_processes(demos.start_process_then_raise, 2, str(tmp_path / "pid"), 1, **SLOW)
    pids = [int((tmp_path / f"pid.{r}").read_text()) for r in range(2)]
    assert _gone_within(pids, 2.0) == []


OOM = r"-9 \(SIGKILL, which is also how the kernel's out-of-memory killer stops a process\)"


@pytest.mark.slow
@pytest.mark.parametrize("how, code", [(3, r"3"), ("SIGSEGV", r"-11 \(SIGSEGV\)"), ("SIGKILL", OOM)])
def test_a_rank_that_dies_is_named_with_its_exit_code(no_leftovers, how, code):
    start = time.monotonic()
    with pytest.raises(RankError, match=rf"^rank 1 of 2 died with exit code {code} before returning a result") as info:
        run_processes(demos.die_on, 2, 1, how, **SLOW)
    assert info.value.rank == 1
    if how == "SIGSEGV":  # faulthandler's report, kept from the rank's stderr, points at the line
        assert "Fatal Python error: Segmentation fault" in str(info.value)
        assert re.search(r"ch08_real_processes.py\", line \d+ in die_on", str(info.value))
    assert time.monotonic() - start < 15.0


@pytest.mark.slow
def test_a_collective_that_one_rank_never_joins_times_out_with_a_clear_error(no_leftovers):
    start = time.monotonic()
    with pytest.raises(
        RankError,
        match=r"^rank 0 of 2 timed out after collective_timeout=1.0s waiting in a "
        r"collective that the other ranks did not join",
    ) as info:
        run_processes(demos.skip_all_reduce_on, 2, 1, "sleep", 60.0, timeout=60.0, collective_timeout=1.0)
    assert info.value.rank == 0
    assert "rank 1 was still running and was stopped" in str(info.value)
    assert 1.0 < time.monotonic() - start < 15.0


@pytest.mark.slow
def test_a_rank_that_skips_a_collective_and_returns_is_reported_at_once(no_leftovers):
    start = time.monotonic()
    with pytest.raises(
        RankError,
        match=r"^rank 0 of 2 failed in a collective:(.|\n)*Connection (closed|reset) by peer"
        r"(.|\n)*rank 1 had returned its result(.|\n)*did they skip a collective",
    ):
        run_processes(demos.skip_all_reduce_on, 2, 1, "return", **SLOW)
    assert time.monotonic() - start < 15.0


@pytest.mark.slow
def test_a_rank_stuck_outside_any_collective_is_stopped_by_the_whole_call_timeout(no_leftovers):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timed out after 3.0s: ranks \[(0, )?1\] of 2 did not finish"):
        run_processes(demos.sleep_on, 2, 1, 60.0, timeout=3.0)
    assert 3.0 <= time.monotonic() - start < 10.0


@pytest.mark.slow
def test_the_ranks_exit_when_the_calling_process_dies(no_leftovers):
    """A notebook kernel that is killed takes its ranks with it (they watch a pipe from it)."""
    code = (
        "from tputil import launch; from tputil.course import ch08_real_processes as demos; "
        "launch.run_processes(demos.report_then_sleep, 2, 60.0, timeout=20.0)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        ready = [parent.stdout.readline() for _ in range(2)]
        pids = [int(re.search(r"pid (\d+) ready", line).group(1)) for line in ready]
        assert all(_running(pid) for pid in pids)
        parent.kill()  # SIGKILL: no chance to clean up
        parent.wait()
        assert _gone_within(pids, 5.0) == []
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_bad_arguments_are_refused_before_anything_starts(no_leftovers):
    with pytest.raises(ValueError, match=r"needs a function the child processes can import"):
        run_processes(lambda group: group.rank, 2)
    with pytest.raises(ValueError, match=r"world_size=0: it must be a positive integer"):
        run_processes(demos.hello, 0)


def echo_plus_rank(group, tensor):
    """Every rank returns the tensor it was given plus its rank."""
    return tensor + group.rank


@pytest.mark.slow
def test_arguments_and_results_larger_than_8_mib_go_through_intact(no_leftovers):
    """They travel through pipes: nothing like the 8 MiB that a message through the TCP store may have."""
    big = torch.randn(3 * 2**20, generator=torch.Generator().manual_seed(0))  # 12 MiB of float32
    results = run_processes(echo_plus_rank, 2, big, backend="gloo", timeout=60.0)
    assert len(results) == 2
    for r, out in enumerate(results):
        assert torch.equal(out, big + r)


@pytest.mark.slow
def test_a_script_without_a_main_guard_fails_at_once_saying_what_to_do(tmp_path):
    """Each child runs the script's top level to find `f`: without the guard it would call run_processes again."""
    body = "from tputil.launch import run_processes\n\n\ndef f(group):\n    return group.rank * 10\n\n\n"
    call = "print('results', run_processes(f, 2, backend='gloo', timeout=60.0))\n"
    unguarded, guarded = tmp_path / "unguarded.py", tmp_path / "guarded.py"
    unguarded.write_text(body + call)
    guarded.write_text(body + "if __name__ == '__main__':\n    " + call)
    start = time.monotonic()
    run = subprocess.run([sys.executable, str(unguarded)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"RuntimeError: run_processes was called from the top level of {unguarded}, without "
        f'an `if __name__ == "__main__":` guard.'
    ), run.stderr
    assert "Put the call to run_processes" in last
    assert "RankError" not in run.stderr and "Can't get attribute" not in run.stderr  # one clear error, not nested
    assert elapsed < 30.0  # at once: the first child that runs the script reports it
    # the same script with the guard runs, its function found in the script by the children
    ok = subprocess.run([sys.executable, str(guarded)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "results [0, 10]" in ok.stdout
