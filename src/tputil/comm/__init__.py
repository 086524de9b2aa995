"""Collectives behind one small interface, counted, and the f/g autograd pairs built on them.

Derived in chapter 2 (the collectives) and chapter 9 (the autograd pairs, used from chapter 3 on).
A `Group` is passed explicitly to every layer: there is no global state. Four kinds of group:

- `SingleGroup()`: one rank of one; every collective is the identity (the one-device shortcut).
- `ThreadGroup`, made by `run_threads(fn, p)`: p Python threads in this process, each running the
  same SPMD function with its own rank. For teaching and debugging inside one notebook kernel; its
  collectives behave like real ones (deterministic rank-order sums, errors instead of hangs).
- `DistGroup()`: real `torch.distributed` (gloo on CPU, NCCL on GPUs), e.g. under `launch`.
- `ShmGroup()`: a DistGroup whose all-reduces of CPU tensors between processes of one machine go
  through shared memory instead of gloo's sockets (chapter 8).

All collectives are out of place (the input is never modified) and not differentiable by
themselves (like torch.distributed's); gradients flow through the autograd pairs of `mappings`.
Every collective that communicates is counted in `group.stats`, and timed when asked; see `CommStats`.
With async_op=True a collective returns a `Handle` whose wait() gives the result, as
torch.distributed's Work does (really asynchronous only for `DistGroup`'s all-reduce).

One file per concept: group.py (the interface, counting), threads.py, dist.py, shm.py, mappings.py.
Import everything from here: `from tputil.comm import run_threads, copy_to_parallel_region`.
"""

from .dist import DistGroup
from .group import KINDS, REDUCE_OPS, CallRecord, CommStats, Group, Handle, SingleGroup, synchronize
from .mappings import (
    copy_to_parallel_region,
    gather_from_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_parallel_region,
    scatter_to_sequence_parallel_region,
)
from .shm import ShmGroup
from .threads import CollectiveAborted, CollectiveError, RankError, ThreadGroup, run_threads

__all__ = [
    "Group",
    "SingleGroup",
    "ThreadGroup",
    "DistGroup",
    "ShmGroup",
    "run_threads",
    "CommStats",
    "CallRecord",
    "Handle",
    "synchronize",
    "CollectiveError",
    "CollectiveAborted",
    "RankError",
    "KINDS",
    "REDUCE_OPS",
    "copy_to_parallel_region",
    "reduce_from_parallel_region",
    "gather_from_parallel_region",
    "scatter_to_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
]
