"""The Group interface every layer talks to, the counting of calls and bytes, and the one-rank group.

Derived in chapter 2. Subclasses: `SingleGroup` here, `ThreadGroup` (threads.py), `DistGroup` (dist.py).
"""

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch


KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
REDUCE_OPS = ("sum", "max", "min")
_COMBINE = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}


def reduce_in_rank_order(tensors, op: str):
    """((t0 op t1) op t2) op ... into a new tensor: the same bits on every rank that computes it."""
    combine = _COMBINE[op]
    if len(tensors) == 1:
        return tensors[0].clone()
    total = combine(tensors[0], tensors[1])
    for t in tensors[2:]:
        combine(total, t, out=total)
    return total


@dataclass(frozen=True)
class CallRecord:
    """One collective call on one rank; nbytes is what this rank put in (see `CommStats`)."""
    kind: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int
    tag: str | None = None


class CommStats:
    """Counts of a rank's collective calls: `calls[kind]`, `bytes[kind]` and a `log` of `CallRecord`s.

    bytes = numel * element_size of the tensor this rank passes in: the whole tensor for
    all_reduce, reduce_scatter and broadcast, this rank's shard for all_gather. It is the size of
    the message, not the traffic on the wire (a ring all-reduce sends 2(p-1)/p of it per rank).
    Calls at world_size 1 return at once without communicating and are not counted.
    Measure a region with `with group.stats.measure() as m: ...`, then read `m.calls["all_reduce"]`.
    """

    def __init__(self):
        self.calls = Counter()
        self.bytes = Counter()
        self.log: list[CallRecord] = []
        self._regions: list["CommStats"] = []

    def record(self, record: CallRecord):
        for stats in (self, *self._regions):
            stats.calls[record.kind] += 1
            stats.bytes[record.kind] += record.nbytes
            stats.log.append(record)

    @contextmanager
    def measure(self):
        """Yield a fresh CommStats that sees only the calls made inside the `with` block."""
        region = CommStats()
        self._regions.append(region)
        try:
            yield region
        finally:
            self._regions.remove(region)

    def reset(self):
        self.calls.clear()
        self.bytes.clear()
        self.log.clear()

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def __repr__(self):
        return f"CommStats(calls={dict(self.calls)}, bytes={dict(self.bytes)})"


class Group:
    """The interface: rank, world_size, device, stats and four out-of-place collectives.

    Subclasses implement `_all_reduce`, `_all_gather`, `_reduce_scatter`, `_broadcast`; the public
    methods here add the one-device shortcut (world_size 1 returns the input itself, uncounted),
    check arguments and count. `tag` is stored in the call log (the autograd pairs tag their calls).
    """

    def __init__(self, rank: int, world_size: int, device=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in range(world_size={world_size})")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device("cpu" if device is None else device)
        self.stats = CommStats()

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"

    def _count(self, kind, t, tag):
        self.stats.record(CallRecord(kind, tuple(t.shape), t.dtype, t.numel() * t.element_size(), tag))

    def all_reduce(self, t, *, op: str = "sum", tag=None):
        """Every rank gets the elementwise reduction (sum by default; "max", "min") over ranks of t."""
        if op not in REDUCE_OPS:
            raise ValueError(f"op={op!r}: supported reductions are {REDUCE_OPS}")
        if self.world_size == 1:
            return t
        out = self._all_reduce(t.detach(), op)
        self._count("all_reduce", t, tag)
        return out

    def all_gather(self, t, *, dim: int = -1, tag=None):
        """Every rank gets the ranks' tensors concatenated along dim, in rank order."""
        if self.world_size == 1:
            return t
        out = self._all_gather(t.detach(), dim % t.dim())
        self._count("all_gather", t, tag)
        return out

    def reduce_scatter(self, t, *, dim: int = -1, tag=None):
        """Rank r gets chunk r (along dim, p equal chunks) of the sum over ranks of t."""
        if self.world_size == 1:
            return t
        dim = dim % t.dim()
        if t.size(dim) % self.world_size != 0:
            raise ValueError(f"reduce_scatter: dim {dim} of shape {tuple(t.shape)} has size {t.size(dim)}, "
                             f"not divisible into p={self.world_size} equal chunks")
        out = self._reduce_scatter(t.detach(), dim)
        self._count("reduce_scatter", t, tag)
        return out

    def broadcast(self, t, *, src: int = 0, tag=None):
        """Every rank gets rank src's t (all ranks pass a tensor of the same shape and dtype)."""
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast: src={src} is not in range(world_size={self.world_size})")
        if self.world_size == 1:
            return t
        out = self._broadcast(t.detach(), src)
        self._count("broadcast", t, tag)
        return out


class SingleGroup(Group):
    """Rank 0 of 1: every collective returns its input. The dense model is the p = 1 case."""

    def __init__(self, device=None):
        super().__init__(0, 1, device)
