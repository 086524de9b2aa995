"""The Group interface every layer talks to, the counting of calls and bytes, and the one-rank group.

Derived in chapter 2. Subclasses: `SingleGroup` here, `ThreadGroup` (threads.py), `DistGroup` (dist.py).
"""

import time
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
        total = combine(total, t)  # out of place: autograd may be recording (`course.lists`)
    return total


@dataclass
class CallRecord:
    """One collective call on one rank; nbytes is what this rank put in (see `CommStats`).

    asynchronous: the group started it asynchronously and returned a Handle still to be waited on
    (`DistGroup`'s all-reduce with async_op=True); False for every call that ran to its end before
    returning, async_op or not. start and seconds: None unless the call was timed (`CommStats`);
    then start is `time.perf_counter()` when the call began, and seconds the time it kept this
    rank: from start until the result was ready, or, started asynchronously, the launch plus the
    wait (`Handle.wait`), None until waited.
    """

    kind: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int
    tag: str | None = None
    asynchronous: bool = False
    start: float | None = None
    seconds: float | None = None


def synchronize(device):
    """Wait until the work queued on `device` is done (CUDA); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Handle:
    """A started collective, as torch.distributed's Work: `wait()` returns its result, the output tensor.

    Returned by every collective called with async_op=True. Started asynchronously (`DistGroup`'s
    all-reduce) the result is being written until `wait()` returns: read it only through wait().
    Every other call has finished when its handle is returned (`is_completed()` is True), and
    wait() returns at once. wait() may be called again; it returns the same tensor.
    """

    def __init__(self, result, work=None):
        self._result = result
        self._work = work  # a torch.distributed Work while in flight, else None
        self._timing = None  # (record, launch seconds, device) of a timed asynchronous call

    def is_completed(self) -> bool:
        """Whether the result is ready (asynchronous: whether the transfer has finished)."""
        return self._work is None or self._work.is_completed()

    def wait(self):
        """Block until the result is ready, then return it (the output tensor)."""
        if self._work is not None:
            waited_from = time.perf_counter() if self._timing else None
            self._work.wait()
            self._work = None
            if self._timing:
                record, launched, device = self._timing
                synchronize(device)
                record.seconds = launched + time.perf_counter() - waited_from  # exposed: launch + wait
        return self._result


class CommStats:
    """Counts of a rank's collective calls: `calls[kind]`, `bytes[kind]` and a `log` of `CallRecord`s.

    bytes = numel * element_size of the tensor this rank passes in: the whole tensor for
    all_reduce, reduce_scatter and broadcast, this rank's shard for all_gather. It is the size of
    the message, not the traffic on the wire (a ring all-reduce sends 2(p-1)/p of it per rank).
    A call is counted once, when it has been started (async_op=True included). Calls at
    world_size 1 return at once without communicating and are not counted.
    Measure a region with `with group.stats.measure() as m: ...`, then read `m.calls["all_reduce"]`.

    Timing: while `timed` is True, or inside `measure(timed=True)`, each call's `CallRecord` gets
    `start` and `seconds` (see there; on CUDA the device is synchronized before each clock reading
    but the one just before an asynchronous wait). Untimed calls read no clock.
    """

    def __init__(self):
        self.calls = Counter()
        self.bytes = Counter()
        self.log: list[CallRecord] = []
        self.timed = False  # time every call (see the class docstring)
        self._regions: list[CommStats] = []

    def record(self, record: CallRecord):
        for stats in (self, *self._regions):
            stats.calls[record.kind] += 1
            stats.bytes[record.kind] += record.nbytes
            stats.log.append(record)

    @property
    def timing(self) -> bool:
        """Whether calls are timed now: `timed`, or an open `measure(timed=True)` region."""
        return self.timed or any(region.timed for region in self._regions)

    @contextmanager
    def measure(self, *, timed: bool = False):
        """Yield a fresh CommStats that sees only the calls made inside the `with` block.

        timed=True: the calls inside are timed (their records carry start and seconds).
        """
        region = CommStats()
        region.timed = timed
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

    Subclasses implement `_all_reduce`, `_all_gather`, `_reduce_scatter`, `_broadcast` (and may
    implement `_start_all_reduce`, which starts an all-reduce and returns a `Handle`); the public
    methods here add the one-device shortcut (world_size 1 returns the input itself, uncounted),
    check arguments, count and time (see `CommStats`). `tag` is stored in the call log (the
    autograd pairs tag their calls). async_op=True returns a `Handle` whose wait() gives the
    result; only an all-reduce on a group that can start one (`DistGroup`) is then really
    asynchronous, every other call runs to its end first and returns a completed handle.
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

    def _start_all_reduce(self, t, op) -> Handle:
        """Start an all-reduce, return its Handle; this default runs it to its end (synchronous)."""
        return Handle(self._all_reduce(t, op))

    def _call(self, kind, t, tag, async_op, run, start=None):
        """One collective on t.detach(): run(x) returns its result; start(x), used when given and async_op, a Handle.

        Counted once it has been started; timed when the stats say so (see `CommStats`).
        """
        timed = self.stats.timing
        if timed:
            synchronize(self.device)
            began = time.perf_counter()
        handle = start(t.detach()) if async_op and start is not None else Handle(run(t.detach()))
        asynchronous = handle._work is not None
        if timed:
            if not asynchronous:
                synchronize(self.device)
            launched = time.perf_counter() - began
        record = CallRecord(kind, tuple(t.shape), t.dtype, t.numel() * t.element_size(), tag, asynchronous)
        if timed:
            record.start = began
            if asynchronous:
                handle._timing = (record, launched, self.device)  # seconds are set by wait()
            else:
                record.seconds = launched
        self.stats.record(record)
        return handle if async_op else handle.wait()

    def all_reduce(self, t, *, op: str = "sum", tag=None, async_op: bool = False):
        """Every rank gets the elementwise reduction (sum by default; "max", "min") over ranks of t.

        async_op=True: a `Handle` whose wait() returns it (started asynchronously on a `DistGroup`).
        """
        if op not in REDUCE_OPS:
            raise ValueError(f"op={op!r}: supported reductions are {REDUCE_OPS}")
        if self.world_size == 1:
            return Handle(t) if async_op else t
        return self._call(
            "all_reduce", t, tag, async_op, lambda x: self._all_reduce(x, op), lambda x: self._start_all_reduce(x, op)
        )

    def all_gather(self, t, *, dim: int = -1, tag=None, async_op: bool = False):
        """Every rank gets the ranks' tensors concatenated along dim, in rank order (async_op: see all_reduce)."""
        if self.world_size == 1:
            return Handle(t) if async_op else t
        dim = dim % t.dim()
        return self._call("all_gather", t, tag, async_op, lambda x: self._all_gather(x, dim))

    def reduce_scatter(self, t, *, dim: int = -1, tag=None, async_op: bool = False):
        """Rank r gets chunk r (along dim, p equal chunks) of the sum over ranks of t (async_op: see all_reduce)."""
        if self.world_size == 1:
            return Handle(t) if async_op else t
        dim = dim % t.dim()
        if t.size(dim) % self.world_size != 0:
            raise ValueError(
                f"reduce_scatter: dim {dim} of shape {tuple(t.shape)} has size {t.size(dim)}, "
                f"not divisible into p={self.world_size} equal chunks"
            )
        return self._call("reduce_scatter", t, tag, async_op, lambda x: self._reduce_scatter(x, dim))

    def broadcast(self, t, *, src: int = 0, tag=None, async_op: bool = False):
        """Every rank gets rank src's t (same shape and dtype on all ranks; async_op: see all_reduce)."""
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast: src={src} is not in range(world_size={self.world_size})")
        if self.world_size == 1:
            return Handle(t) if async_op else t
        return self._call("broadcast", t, tag, async_op, lambda x: self._broadcast(x, src))


class SingleGroup(Group):
    """Rank 0 of 1: every collective returns its input. The dense model is the p = 1 case."""

    def __init__(self, device=None):
        super().__init__(0, 1, device)
