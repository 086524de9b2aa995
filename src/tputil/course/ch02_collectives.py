"""Rank functions that chapters run on real processes with `tputil.launch.run_processes`.

The children that `run_processes` spawns import the function they run by module and name, so a
function defined in a notebook cell cannot be used; the ones a chapter needs live here. Each is
plain SPMD code on a `Group`, so `comm.run_threads` runs it too (the tests do, to stay fast).

Chapter 2: `collectives_demo` (the four collectives and all-reduce = reduce-scatter + all-gather),
`time_all_reduce` (a small benchmark) and `collectives_tour` (both, in one spawn).
"""

from functools import partial

import torch

from ..bench.timing import slowest_rank_seconds


def collectives_demo(group, xs, *, src=0, dim=-1):
    """Rank r passes xs[r] to each of the four collectives; returns what it got back, in a dict.

    Keys: rank, world_size, all_reduce, all_gather, reduce_scatter, broadcast, rs_then_ag (an
    all-gather of the reduce-scatter's chunk), calls (this rank's collective calls, counted) and
    input_untouched (the collectives are out of place).
    """
    if len(xs) != group.world_size:
        raise ValueError(f"collectives_demo needs one tensor per rank: got {len(xs)} for world_size={group.world_size}")
    x = xs[group.rank]
    before = x.clone()
    with group.stats.measure() as m:
        out = dict(
            all_reduce=group.all_reduce(x),
            all_gather=group.all_gather(x, dim=dim),
            reduce_scatter=group.reduce_scatter(x, dim=dim),
            broadcast=group.broadcast(x, src=src),
        )
        out["rs_then_ag"] = group.all_gather(out["reduce_scatter"], dim=dim)
    return dict(
        rank=group.rank, world_size=group.world_size, **out, calls=dict(m.calls), input_untouched=torch.equal(x, before)
    )


def time_all_reduce(group, sizes, *, reps=5, warmup=2):
    """Seconds per all-reduce of a float32 tensor of each size in `sizes` (bytes), on this group.

    First one untimed all-reduce of every size, in order (the first calls of a fresh group pay for
    setting it up); then for each size `warmup` untimed calls and `reps` timed ones; a call's time is the slowest
    rank's (an all-reduce is done when the last rank has its result), and the median over the reps
    is reported (`bench.timing.slowest_rank_seconds`). Returns {"nbytes": [...], "seconds": [...],
    "world_size": p}, the same on every rank. The group's out-of-place copy of the input is part
    of what is timed.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps={reps} must be >= 1 and warmup={warmup} >= 0")
    for nbytes in sizes:
        if nbytes % 4 != 0 or nbytes <= 0:
            raise ValueError(f"size {nbytes} bytes: use a positive multiple of 4 (float32 numbers)")
    for nbytes in sizes:  # a fresh group's first calls also set up connections and buffers: not timed
        group.all_reduce(torch.ones(nbytes // 4, device=group.device))
    seconds = [
        slowest_rank_seconds(
            partial(group.all_reduce, torch.ones(nbytes // 4, device=group.device)), group, reps=reps, warmup=warmup
        )
        for nbytes in sizes
    ]
    return dict(nbytes=list(sizes), seconds=seconds, world_size=group.world_size)


def collectives_tour(group, xs, sizes, reps=5, warmup=2):
    """Chapter 2 on real processes, in one spawn: `collectives_demo`, then `time_all_reduce`.

    reps and warmup are positional too, since `run_processes` passes only positional arguments.
    """
    demo = collectives_demo(group, xs)
    timings = time_all_reduce(group, sizes, reps=reps, warmup=warmup)
    return dict(demo=demo, timings=timings, backend=getattr(group, "backend", None))
