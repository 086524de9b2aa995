"""p ranks as p Python threads in one process: `run_threads` and its `ThreadGroup`.

Derived in chapter 2, used in every chapter after it to run the same SPMD code on p ranks inside
one notebook kernel. The collectives behave like real ones: each rank's n-th collective meets the
others' n-th; the result is computed once, combining ranks in rank order (so an all-reduce gives
the same bits on every rank, every time); ranks that disagree, or leave while others wait, get an
error at once instead of a hang. Torch releases the GIL inside its ops, so the threads do run.
"""

import threading
import time
from dataclasses import dataclass

import torch

from .group import Group, reduce_in_rank_order


class CollectiveError(RuntimeError):
    """Ranks disagree about a collective: different calls, a rank that left, or a timeout."""


class CollectiveAborted(CollectiveError):
    """A rank stopped waiting because another rank raised (a consequence, not the cause)."""


@dataclass
class _Call:
    kind: str
    tensor: torch.Tensor
    params: tuple  # (("dim", 1),) or (("src", 0),) or (("op", "sum"),)

    def signature(self):
        return (self.kind, tuple(self.tensor.shape), self.tensor.dtype, self.params)

    def __str__(self):
        extra = "".join(f", {k}={v!r}" for k, v in self.params)
        return f"{self.kind}(shape={tuple(self.tensor.shape)}, dtype={self.tensor.dtype}{extra})"


class _Slot:
    def __init__(self):
        self.calls: dict[int, _Call] = {}
        self.results = None
        self.error = None
        self.taken = 0


def _compute(kind, params, tensors, world_size):
    """The result of one collective for every rank, computed once, combining ranks in rank order."""
    p = dict(params)
    if kind in ("all_reduce", "reduce_scatter"):
        total = reduce_in_rank_order(tensors, p.get("op", "sum"))  # ((t0 + t1) + t2) + ...
        if kind == "all_reduce":
            return [total.clone() for _ in range(world_size)]
        return [c.clone() for c in total.chunk(world_size, dim=p["dim"])]
    if kind == "all_gather":
        total = torch.cat(tensors, dim=p["dim"])
        return [total.clone() for _ in range(world_size)]
    if kind == "broadcast":
        return [tensors[p["src"]].clone() for _ in range(world_size)]
    raise ValueError(kind)


class _ThreadWorld:
    """The rendezvous shared by the p threads of one `run_threads` call.

    Collective number n (counting from 1, per rank) of every rank meets in slot n: each rank
    deposits its tensor, the last to arrive computes all results, everyone takes its own.
    """

    def __init__(self, world_size, timeout):
        self.world_size = world_size
        self.timeout = timeout
        self.cond = threading.Condition()
        self.ncalls = [0] * world_size  # collectives entered so far, per rank
        self.slots: dict[int, _Slot] = {}
        self.returned: set[int] = set()  # ranks whose fn returned normally
        self.failure = None  # set when a rank raised: everyone waiting gives up

    def collective(self, rank, call: _Call):
        with self.cond:
            n = self.ncalls[rank] = self.ncalls[rank] + 1
            if self.failure is not None:
                raise CollectiveAborted(f"rank {rank} gave up on collective #{n} ({call.kind}): {self.failure}")
            slot = self.slots.setdefault(n, _Slot())
            slot.calls[rank] = call
            self._check(n, slot)
            if slot.error is None and len(slot.calls) == self.world_size:
                ordered = [slot.calls[r].tensor for r in range(self.world_size)]
                try:
                    slot.results = _compute(call.kind, call.params, ordered, self.world_size)
                except Exception as exc:  # e.g. tensors on different devices: every rank gets the error
                    slot.error = f"collective #{n} ({call.kind}) failed: {type(exc).__name__}: {exc}"
                self.cond.notify_all()
            deadline = time.monotonic() + self.timeout
            while slot.results is None and slot.error is None and self.failure is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [r for r in range(self.world_size) if r not in slot.calls]
                    slot.error = (
                        f"timed out after {self.timeout}s in collective #{n} ({call.kind}): "
                        f"ranks {sorted(slot.calls)} are waiting, ranks {missing} never arrived"
                    )
                    self.cond.notify_all()
                    break
                self.cond.wait(remaining)
            if slot.results is not None:
                slot.taken += 1
                if slot.taken == self.world_size:
                    del self.slots[n]
                return slot.results[rank]
            if slot.error is not None:
                raise CollectiveError(slot.error)
            raise CollectiveAborted(f"rank {rank} gave up on collective #{n} ({call.kind}): {self.failure}")

    def _check(self, n, slot):
        """Flag slot n if its calls disagree or a rank finished before reaching it. Holds the lock."""
        if slot.error is not None:
            return
        calls = slot.calls
        if len({c.signature() for c in calls.values()}) > 1:
            said = "; ".join(f"rank {r} called {calls[r]}" for r in sorted(calls))
            slot.error = (
                f"collective #{n} does not match across ranks: {said}. Every rank must call the "
                f"same collectives, with the same shapes and dtypes, in the same order"
            )
        for r in sorted(self.returned):
            if slot.error is None and self.ncalls[r] < n:
                kind = next(iter(calls.values())).kind
                slot.error = (
                    f"rank {r} returned without calling collective #{n} ({kind}), which ranks "
                    f"{sorted(calls)} are waiting in (rank {r} made {self.ncalls[r]} collective calls)"
                )
        if slot.error is not None:
            self.cond.notify_all()

    def abort(self, reason):
        with self.cond:
            self.failure = self.failure or reason
            self.cond.notify_all()

    def finish(self, rank, exc=None):
        with self.cond:
            if exc is None:
                self.returned.add(rank)
            elif self.failure is None:
                self.failure = f"rank {rank} raised {type(exc).__name__}: {exc}"
            for n, slot in self.slots.items():
                if slot.results is None:
                    self._check(n, slot)
            self.cond.notify_all()


class ThreadGroup(Group):
    """Rank `rank` of a `run_threads` world: collectives rendezvous with the other threads."""

    def __init__(self, world: _ThreadWorld, rank: int):
        super().__init__(rank, world.world_size)
        self._world = world

    def _all_reduce(self, t, op):
        return self._world.collective(self.rank, _Call("all_reduce", t, (("op", op),)))

    def _all_gather(self, t, dim):
        return self._world.collective(self.rank, _Call("all_gather", t, (("dim", dim),)))

    def _reduce_scatter(self, t, dim):
        return self._world.collective(self.rank, _Call("reduce_scatter", t, (("dim", dim), ("op", "sum"))))

    def _broadcast(self, t, src):
        return self._world.collective(self.rank, _Call("broadcast", t, (("src", src),)))


class RankError(RuntimeError):
    """A rank of `run_threads` or `launch.run_processes` failed; `.rank` says which."""

    def __init__(self, rank, message):
        super().__init__(message)
        self.rank = rank


def run_threads(fn, world_size: int, *args, timeout: float = 30.0, **kwargs) -> list:
    """Run fn(group, *args, **kwargs) on world_size threads, rank r getting a ThreadGroup of rank r.

    Returns the ranks' return values, in rank order. If a rank raises, the others stop waiting in
    their collectives and a RankError naming the rank is raised from the original exception (the
    first rank to fail for a reason of its own; ranks that merely gave up are not reported).
    `timeout` bounds each wait inside a collective, a last resort against a rank that never comes.
    Grad mode is carried over from the caller (torch.no_grad() around run_threads applies inside),
    and each rank gets torch.get_num_threads() // world_size intra-op threads (at least 1).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: it must be >= 1")
    world = _ThreadWorld(world_size, timeout)
    results, errors = [None] * world_size, [None] * world_size
    grad_enabled = torch.is_grad_enabled()
    # The ranks share this machine's cores: give each its share of torch's intra-op threads, or
    # p thread teams spin against each other and tiny ops slow down a hundredfold.
    threads_before = torch.get_num_threads()
    threads_per_rank = max(1, threads_before // world_size)

    def main(rank):
        try:
            torch.set_num_threads(threads_per_rank)
            with torch.set_grad_enabled(grad_enabled):
                results[rank] = fn(ThreadGroup(world, rank), *args, **kwargs)
        except BaseException as exc:  # noqa: B902 - reported to the caller below
            errors[rank] = exc
            world.finish(rank, exc)
        else:
            world.finish(rank)

    threads = [threading.Thread(target=main, args=(r,), name=f"rank{r}", daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.1)  # in short steps, so that an interrupt (Ctrl-C in a notebook) gets through
    except KeyboardInterrupt:
        world.abort("run_threads was interrupted")
        raise
    finally:
        torch.set_num_threads(threads_before)  # the setting is partly process-wide: put it back
    failed = [r for r in range(world_size) if errors[r] is not None]
    if failed:
        causes = [r for r in failed if not isinstance(errors[r], CollectiveAborted)] or failed
        r = causes[0]
        raise RankError(r, f"rank {r} of {world_size} failed: {type(errors[r]).__name__}: {errors[r]}") from errors[r]
    return results
