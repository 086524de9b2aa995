"""Chapter 2's all-reduce timings as a command, for a run stored with the book (chapters 2 and 14).

    python -m tputil.bench.all_reduce                    # 2 gloo processes, 4 KiB ... 16 MiB
    python -m tputil.bench.all_reduce --json out.json

A benchmark, not a test. p processes (`launch.run_processes`, gloo on CPU) all-reduce float32
tensors of each size, as chapter 2 does (`course.ch02_collectives.time_all_reduce`: every size
once untimed, then per size `--warmup` untimed calls and `--reps` timed ones, the slowest rank's
time, the median over the reps). It prints the times and the alpha-beta model fitted to them
(`course.cost.fit_latency_bandwidth`); --json also writes the sizes, the times and what made
the run (`timing.made_by`).
"""

import argparse
import sys

from ..course import cost
from ..course.ch02_collectives import time_all_reduce
from ..launch import run_processes
from . import timing

SIZES = [4 * 2**10 * 2**k for k in range(13)]  # 4 KiB, 8 KiB, ..., 16 MiB: chapter 2's


def timings(group, sizes, reps, warmup):
    """One rank: `time_all_reduce` with reps and warmup positional, as `run_processes` passes them."""
    return time_all_reduce(group, sizes, reps=reps, warmup=warmup)


def run(*, p=2, sizes=SIZES, reps=10, warmup=2, backend="gloo") -> dict:
    """{"setup": ..., "nbytes": [...], "seconds": [...], "latency": s a ring step, "bandwidth": bytes/s}."""
    if p < 2:
        raise ValueError(f"p={p}: an all-reduce needs at least 2 processes; use --p 2 or more")
    timed = run_processes(timings, p, list(sizes), reps, warmup, backend=backend, timeout=300)[0]
    latency, bandwidth = cost.fit_latency_bandwidth("all_reduce", timed["nbytes"], timed["seconds"], p)
    setup = dict(p=p, reps=reps, warmup=warmup, backend=backend, dtype="float32")
    return dict(setup=setup, nbytes=timed["nbytes"], seconds=timed["seconds"], latency=latency, bandwidth=bandwidth)


def table(result) -> str:
    s = result["setup"]
    lines = [
        f"all-reduce of float32 tensors on {s['p']} {s['backend']} processes; median of {s['reps']} "
        f"(slowest rank), after {s['warmup']} untimed calls",
        f"{'bytes':>10}{'ms':>10}{'model ms':>10}",
    ]
    for n, t in zip(result["nbytes"], result["seconds"]):
        model = cost.ring_time("all_reduce", n, s["p"], latency=result["latency"], bandwidth=result["bandwidth"])
        lines.append(f"{n:>10}{t * 1e3:>10.3f}{model * 1e3:>10.3f}")
    lines.append(
        f"fitted: alpha {result['latency'] * 1e6:.0f} us a ring step, beta {result['bandwidth'] / 1e6:.0f} MB/s"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tputil.bench.all_reduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--reps", type=int, default=10, help="timed all-reduces per size (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed ones before them (default 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    return timing.run_command(
        parser,
        "python -m tputil.bench.all_reduce",
        argv,
        args.json,
        lambda: run(p=args.p, reps=args.reps, warmup=args.warmup),
        table,
    )


if __name__ == "__main__":
    from tputil.bench import all_reduce  # the package's module, not this __main__ copy

    raise SystemExit(all_reduce.main())
