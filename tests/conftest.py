"""What every package test shares: the thread count, and the check that a test leaves nothing behind.

Plain helpers (the small config, tolerances, `make_gpt`) live in tp_helpers, which tests import.
The `slow` marker (registered in pyproject.toml) marks the tests that start processes, run torchrun,
build the book or drive the browser; `make test-fast` runs the rest.
"""

import glob
import tempfile

import psutil
import pytest

# Where ShmGroup puts its segment (tputil.comm.shm): /dev/shm, or the temp folder where there is none.
SHM_SEGMENTS = ("/dev/shm/tputil-shm-*", f"{tempfile.gettempdir()}/tputil-shm-*")


def pytest_configure(config):
    # One intra-op thread per test process: pytest-xdist runs two workers on a 2-core machine, and two
    # teams of OpenMP threads spinning against each other make tiny ops a hundred times slower. Set here,
    # before any test module is imported, so that importing tp_helpers changes nothing. Not in the xdist
    # controller, which runs no test (and need not import torch).
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import torch

    torch.set_num_threads(1)


def _running_descendants():
    """This process's children and grandchildren that still run (a zombie has exited, only not been reaped)."""
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _describe(proc):
    try:
        return proc.pid, proc.cmdline()
    except psutil.Error:
        return proc.pid, "(exited)"


@pytest.fixture
def no_leftovers():
    """Fail if the test leaves running a process it started (a child or grandchild of this one).

    Checked as soon as the test returns, with no grace period: whatever started the processes must have
    stopped and reaped them by then. Processes that leave this tree (orphans whose parent died) are not
    seen here: tests that make such processes track them by pid themselves.
    """
    before = {proc.pid for proc in _running_descendants()}
    yield
    left = [_describe(proc) for proc in _running_descendants() if proc.pid not in before]
    assert left == [], f"processes left behind: {left}"


@pytest.fixture
def no_leftover_shm(no_leftovers):
    """`no_leftovers`, and no new ShmGroup segment file left in /dev/shm (or the temp folder).

    Only for the tests that make ShmGroups: the files carry no owner, so a ShmGroup alive in the other
    xdist worker at that moment would count too.
    """
    before = {path for pattern in SHM_SEGMENTS for path in glob.glob(pattern)}
    yield
    after = {path for pattern in SHM_SEGMENTS for path in glob.glob(pattern)}
    assert after <= before, f"shared-memory segments left behind: {sorted(after - before)}"
