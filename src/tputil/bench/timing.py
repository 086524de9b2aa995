"""Timing whole runs on every rank: the one way the chapters and the benchmark time a piece of work.

`slowest_rank_seconds(run, group, reps=..., warmup=...)`: the median over reps of the slowest
rank's seconds for run(), the same number on every rank (chapter 2's all-reduce timings, chapter
8's forward passes); `slowest_rank_times` keeps every rep. Its two steps are public for a caller
that times in its own rounds (the benchmark, `bench.ranks`): `line_up(group)` and
`seconds(run, device)`. `made_by(prog, argv)`: what a stored run records about the command and the
machine that made it (chapters 13 and 14 read such runs).

The time of single collectives, call by call, is recorded by the group itself
(`group.stats.measure(timed=True)`, see `comm.CommStats`).
"""

import json
import os
import platform
import shlex
import statistics
import time

import torch

from ..comm import synchronize


def line_up(group):
    """Return once every rank of group has arrived: an all-reduce of one number (nothing at world_size 1)."""
    if group is not None and group.world_size > 1:
        group.all_reduce(torch.zeros(1, device=group.device))


def seconds(run, device="cpu"):
    """(seconds, result) of one call of run(); on CUDA the device is synchronized before each clock reading."""
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - start, result


def slowest_rank_seconds(run, group=None, *, reps: int = 20, warmup: int = 3) -> float:
    """Median of `slowest_rank_times(run, group, reps=reps, warmup=warmup)`."""
    return statistics.median(slowest_rank_times(run, group, reps=reps, warmup=warmup))


def slowest_rank_times(run, group=None, *, reps: int = 20, warmup: int = 3) -> list[float]:
    """The slowest rank's seconds for each of reps calls of run(), after warmup untimed calls.

    With a group of several ranks every rank must call it, with a run that makes the same
    collectives on every rank. Before each timed call the ranks line up (`line_up`); after it an
    all-reduce (max) of the elapsed seconds gives the call's time on its slowest rank, the time
    the call really took. Those collectives are outside the timed region (counted in
    group.stats all the same). group None: this process alone. Returns the same list on every rank.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps={reps} must be >= 1 and warmup={warmup} >= 0")
    device = "cpu" if group is None else group.device
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        line_up(group)
        elapsed = torch.tensor([seconds(run, device)[0]], dtype=torch.float64, device=device)
        if group is not None:
            elapsed = group.all_reduce(elapsed, op="max")  # the slowest rank's time
        times.append(elapsed.item())
    return times


_ENVIRONMENT = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR")


def machine() -> dict:
    """What ran the benchmark, for a stored run: the CPU, its cores, the system, Python, torch, the
    load average, and the environment variables that change CPU timings (those set)."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:  # no /proc (macOS, Windows): the processor's name from platform
        pass
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # Windows has no load average
        load = None
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        system=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        load_average_before=load,
        environment={k: os.environ[k] for k in _ENVIRONMENT if k in os.environ},
    )


def made_by(prog: str, argv) -> dict:
    """`machine()` and the command line that made a run: the timing-relevant variables set, prog, argv."""
    out = machine()
    env = [f"{k}={shlex.quote(v)}" for k, v in out["environment"].items()]
    out["command"] = " ".join([*env, prog, *map(shlex.quote, argv)])
    return out


def run_command(parser, prog: str, argv, json_path, run, table) -> int:
    """The end of a benchmark's command line: run it, print its table, and write the result as
    JSON to `json_path` (when given) with `made_by` beside it. A ValueError of `run` (bad sizes)
    becomes the parser's usage error, naming the flag to change."""
    made = made_by(prog, argv)
    try:
        result = run()
    except ValueError as exc:
        parser.error(str(exc))
    print(table(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(result, made_by=made), f, indent=1)
            f.write("\n")
    return 0
