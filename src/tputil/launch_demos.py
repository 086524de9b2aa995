"""Rank functions that go wrong on purpose, for `launch.run_processes` (chapter 8 and its tests).

Each is plain SPMD code on a `Group`: `bad_rank` misbehaves in one way, the other ranks do the
normal thing (most wait in an all-reduce that needs every rank). They live in the package because
the child processes import the function they run by module and name.
"""

import os
import signal
import subprocess
import sys
import time

import torch


def hello(group, tag=""):
    """Every rank prints a line and returns (rank, world_size, pid, sum over ranks of rank + 1)."""
    print(f"hello from rank {group.rank} of {group.world_size} {tag}".rstrip())
    total = group.all_reduce(torch.tensor([group.rank + 1.0]))
    return group.rank, group.world_size, os.getpid(), total.item()


def raise_on(group, bad_rank=1):
    """bad_rank raises a ValueError; the others wait for it in an all-reduce."""
    if group.rank == bad_rank:
        raise ValueError(f"rank {group.rank} fails on purpose")
    return group.all_reduce(torch.ones(1))


def die_on(group, bad_rank=1, how=3):
    """bad_rank's process ends without a word: os._exit(how) for an int, else the signal named `how`."""
    if group.rank == bad_rank:
        sys.stdout.flush()
        if isinstance(how, int):
            os._exit(how)
        os.kill(os.getpid(), getattr(signal, how))
        time.sleep(10)  # a signal is delivered at once; never reached
    return group.all_reduce(torch.ones(1))


def skip_all_reduce_on(group, bad_rank=1, then="sleep", seconds=60.0):
    """bad_rank skips the all-reduce the others wait in, then sleeps (stays alive) or returns."""
    if group.rank == bad_rank:
        if then == "sleep":
            time.sleep(seconds)
        return None
    return group.all_reduce(torch.ones(1))


def sleep_on(group, bad_rank=1, seconds=60.0):
    """bad_rank sleeps outside any collective; the others return at once."""
    if group.rank == bad_rank:
        time.sleep(seconds)
    return group.rank


def start_process_then_raise(group, pid_path, bad_rank=1):
    """Every rank starts a long `sleep` process and writes its pid to f"{pid_path}.{rank}"; then
    bad_rank raises while the others wait in an all-reduce. Nothing they started may survive."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(f"{pid_path}.{group.rank}", "w") as f:
        f.write(str(child.pid))
    group.all_reduce(torch.ones(1))  # every rank has written its pid
    return raise_on(group, bad_rank)


def report_then_sleep(group, seconds=60.0):
    """Every rank prints "rank r pid n ready", then sleeps outside any collective."""
    print(f"rank {group.rank} pid {os.getpid()} ready", flush=True)
    time.sleep(seconds)


def big_result(group, n_floats):
    """Every rank returns a tensor of n_floats float32 numbers (a large result: 3 * 2**20 of them are 12 MiB)."""
    return torch.zeros(n_floats)


def shm_slots(group, slots=(1, 2), delay=0.2, ordered_stores=None):
    """Two all-reduces through a ShmGroup with each number of `slots`, rank 1 slow to read; returns the sums.

    Rank r brings r + 1, then 10 * (r + 1): the right sums are 3 and 30 (at p = 2). Rank 1 waits
    `delay` seconds between seeing that everyone has written and reading the buffers. With two
    slots that is harmless; with one, rank 0 meanwhile writes its second tensor over its first,
    and rank 1's first sum comes out wrong, with no error. ordered_stores: ShmGroup's setting
    (None: the processor's), so that the barrier it uses on other processors can be tried here.
    """
    from .comm import ShmGroup

    class SlowReader(ShmGroup):
        def _wait_for(self, slot, seq):
            super()._wait_for(slot, seq)
            if self.rank == 1:
                time.sleep(delay)

    out = {}
    for n in slots:
        shm = type(f"SlowReader{n}", (SlowReader,), {"slots": n, "ordered_stores": ordered_stores})(
            group.process_group, timeout=20.0)
        out[n] = [shm.all_reduce(torch.full((4,), float(group.rank + 1) * scale)).tolist() for scale in (1, 10)]
    return out
