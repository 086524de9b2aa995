"""The tensor-parallel GPT on real processes: the rank functions that chapter 8 runs.

Derived in chapter 8 (real processes). `launch.run_processes` starts fresh Python processes
that find the function they run by module and name, so a chapter's rank functions live here and
not in notebook cells. Each is plain SPMD code on a `Group`: `comm.run_threads` runs it
unchanged (that is the chapter's point: same code, same numbers), and so do the tests.

- `tp_forward(group, dense, idx, targets)`: this rank's `TPGPT` built from the dense model, one
  forward pass, with its logits, loss and collectives counted.
- `timed_all_reduces(group)`: a context manager that yields the (start, end) of each all-reduce
  this rank makes inside it, read from the group's timed `CommStats` records.
- `time_forward(model, idx, group=...)`: median seconds per forward pass, the slowest rank's
  (`bench.timing.slowest_rank_seconds`).
- `profile_forward(model, idx)`: torch.profiler's table of one forward pass, with its op names.
- `tp_tour(group, dense, idx, targets, timing_runs, reps)`: all of chapter 8's work on real
  ranks in one call (starting processes costs seconds): the forward, what the launcher told this
  process, timings of the TP forward for each (config, B, T) in `timing_runs`, and a profile on
  rank 0.
- `transport_tour(group, dense, idx, targets, ...)`: the same on a `comm.ShmGroup` (run it with
  `run_processes(..., shm=True)`): the forward, all-reduces timed through gloo and through shared
  memory, and what a mismatched all-reduce reports.

The arguments and results of `run_processes` travel pickled, through pipes between the parent and
each rank: the chapter's model (220 K parameters) travels whole, but the larger models that are
only timed are built on every rank from a seed, as a real program builds or loads its shard on
each rank instead of sending it.
"""

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from ..bench.timing import line_up, slowest_rank_seconds, slowest_rank_times
from ..model import GPT
from ..tp_model import TPGPT

_rng_lock = threading.Lock()  # the ranks of run_threads share the process's random generator
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def tp_forward(group, dense, idx, targets=None):
    """This rank's slice of `dense` (a `model.GPT`), one forward pass without gradients.

    Returns a dict: rank, world_size, logits (B, T, V) and loss (replicated: every rank holds all),
    calls and bytes (this rank's collectives in the pass, as `CommStats` counts them) and shapes
    (the shape of each collective's input, in call order).
    """
    model = TPGPT.from_dense(dense, group=group).eval()
    with torch.no_grad(), group.stats.measure() as m:
        logits, loss = model(idx, targets)
    return dict(
        rank=group.rank,
        world_size=group.world_size,
        logits=logits,
        loss=loss,
        calls=dict(m.calls),
        bytes=dict(m.bytes),
        shapes=[r.shape for r in m.log],
    )


@contextmanager
def timed_all_reduces(group):
    """Time every all-reduce `group` makes inside the block; yields a list of (start, end), one per call.

    start and end are `time.perf_counter()` readings, from the group's own records
    (`group.stats.measure(timed=True)`), put in the list when the block ends: this rank's wait
    inside each all-reduce, the transfer plus any time spent waiting for a slower rank to arrive.
    At world_size 1 (and for a `SingleGroup`) nothing is communicated, and the list stays empty.
    """
    spans = []
    with group.stats.measure(timed=True) as m:
        yield spans
    spans.extend((r.start, r.start + r.seconds) for r in m.log if r.kind == "all_reduce")


def forward_times(model, idx, *, group=None, reps=20, warmup=3):
    """Seconds of each of reps forward passes of `model` on `idx` (no gradients), the slowest rank's.

    With a group of several ranks every rank must call it (each forward communicates); see
    `bench.timing.slowest_rank_times`, which lines the ranks up before each timed pass and takes
    each pass's slowest rank. Returns the same list on every rank.
    """
    with torch.no_grad():
        return slowest_rank_times(lambda: model(idx), group, reps=reps, warmup=warmup)


def time_forward(model, idx, *, group=None, reps=20, warmup=3):
    """Median of `forward_times`: seconds per forward pass, the slowest rank's."""
    return statistics.median(forward_times(model, idx, group=group, reps=reps, warmup=warmup))


def profile_forward(model, idx, *, row_limit=12):
    """torch.profiler on the CPU around one forward pass: (its table as text, the names of its ops).

    The table lists the ops that took the most time in total, children included; the op names
    (every op the profiler saw, e.g. aten::addmm, or gloo's all-reduce) let a caller check what
    ran without reading times.
    """
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(idx)
    events = prof.key_averages()
    table = events.table(sort_by="cpu_time_total", row_limit=row_limit, max_name_column_width=36)
    return table, sorted({e.key for e in events})


def seeded_gpt_and_batch(config, B, T, *, seed=0):
    """A dense GPT (GPT-2's init) and a (B, T) batch of random tokens, the same on every rank for a seed.

    The global random state is left as it was (torch.random.fork_rng; one rank at a time when the
    ranks are threads of one process, which share the generator).
    """
    with _rng_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dense = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    return dense, idx


def tp_tour(group, dense, idx, targets, timing_runs=(), reps=20):
    """Chapter 8 on real ranks, in one call: the forward, the environment, timings and a profile.

    Returns a dict: "forward" (`tp_forward`'s result), "env" (the torchrun-style variables this
    process was started with, None where unset), "pid", "backend", "threads" (torch's intra-op
    threads), and "timing": for each (config, B, T) in `timing_runs`, the median seconds of the TP
    forward of `seeded_gpt_and_batch(config, B, T)` ("forward", `forward_times`) and the fastest and
    slowest of those passes ("forward_range"), the median seconds of one all-reduce of the pass's
    message, (B, T, C) float32 ("all_reduce"), and one more pass timed on its own: "one_pass"
    seconds, and "all_reduces", the (start, end) of each all-reduce in seconds from the start of
    that pass (`timed_all_reduces`; none at world_size 1); "profile": rank 0's
    `profile_forward` of the TP model of `dense` (None on the other ranks, which run the pass too).
    """
    out = dict(
        forward=tp_forward(group, dense, idx, targets),
        pid=os.getpid(),
        backend=getattr(group, "backend", None),
        threads=torch.get_num_threads(),
        env={k: os.environ.get(k) for k in TORCHRUN_VARIABLES},
        timing=[],
    )
    for config, B, T in timing_runs:
        timing_dense, timing_idx = seeded_gpt_and_batch(config, B, T)
        model = TPGPT.from_dense(timing_dense, group=group).eval()
        times = forward_times(model, timing_idx, group=group, reps=reps)
        message = torch.zeros(B, T, config.n_embd)  # what each of the pass's all-reduces carries
        all_reduce = slowest_rank_seconds(lambda m=message: group.all_reduce(m), group, reps=reps)
        line_up(group)
        with torch.no_grad(), timed_all_reduces(group) as spans:
            start = time.perf_counter()
            model(timing_idx)
            total = time.perf_counter() - start
        out["timing"].append(
            dict(
                forward=statistics.median(times),
                forward_range=(min(times), max(times)),
                one_pass=total,
                all_reduces=[(a - start, b - start) for a, b in spans],
                all_reduce=all_reduce,
            )
        )
    model = TPGPT.from_dense(dense, group=group).eval()
    if group.rank == 0:
        out["profile"] = profile_forward(model, idx)
    else:
        with torch.no_grad():
            model(idx)
        out["profile"] = None
    return out


def transport_tour(group, dense, idx, targets, sizes=(), timing_runs=(), reps=20):
    """Chapter 8's transports on real ranks: `group` is a ShmGroup, `DistGroup` on its processes is gloo.

    Returns a dict: "forward": `tp_forward` on the ShmGroup; "all_reduce": for each n in `sizes`,
    the median seconds of an all-reduce of n floats through gloo and through shared memory;
    "timing": for each (config, B, T) in `timing_runs`, the median seconds of the TP forward on
    either; "mismatch": the error of an all-reduce to which the ranks bring different sizes.
    """
    from ..comm import CollectiveError, DistGroup

    both = (("gloo", DistGroup(group.process_group)), ("shm", group))
    out = dict(
        forward=tp_forward(group, dense, idx, targets),
        kind=type(group).__name__,
        all_reduce=[
            {
                name: slowest_rank_seconds(partial(g.all_reduce, torch.randn(n)), g, reps=reps, warmup=2)
                for name, g in both
            }
            for n in sizes
        ],
        timing=[],
    )
    for config, B, T in timing_runs:
        timing_dense, timing_idx = seeded_gpt_and_batch(config, B, T)
        out["timing"].append(
            {
                name: time_forward(TPGPT.from_dense(timing_dense, group=g).eval(), timing_idx, group=g, reps=reps)
                for name, g in both
            }
        )
    try:
        group.all_reduce(torch.ones(3 + group.rank))  # rank 0 brings 3 numbers, rank 1 brings 4
        out["mismatch"] = None
    except CollectiveError as exc:
        out["mismatch"] = str(exc)
    return out


# Rank functions that go wrong on purpose (the launcher's failures, and ShmGroup's slots). Each is
# plain SPMD code on a `Group`: `bad_rank` misbehaves in one way, the other ranks do the normal
# thing (most wait in an all-reduce that needs every rank).
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
    `delay` seconds between seeing that everyone has written and reading the buffers (ShmGroup's
    read_delay). With two slots that is harmless; with one, rank 0 meanwhile writes its second
    tensor over its first, and rank 1's first sum comes out wrong, with no error. ordered_stores:
    ShmGroup's setting (None: the processor's), so that the barrier it uses on other processors
    can be tried here. Returns {n: [first sum, second sum]} as lists.
    """
    from ..comm import ShmGroup

    out = {}
    for n in slots:
        shm = ShmGroup(
            group.process_group,
            timeout=20.0,
            slots=n,
            ordered_stores=ordered_stores,
            read_delay=delay if group.rank == 1 else 0.0,
        )
        out[n] = [shm.all_reduce(torch.full((4,), float(group.rank + 1) * scale)).tolist() for scale in (1, 10)]
    return out
