"""What a collective costs on a ring of p devices: bytes sent per device, steps, and a time model.

Derived in chapter 2, which simulates the ring step by step on per-device lists and checks these
formulas against the bytes it counted; chapter 3 applies them to the parallel linear layers.

``nbytes`` is always what ``CommStats`` counts: the size of the tensor one device passes in. That
is the whole tensor for ``all_reduce``, ``reduce_scatter`` and ``broadcast``, and the device's own
shard for ``all_gather`` (whose result is p times larger). So ``ring_bytes(kind, m.bytes[kind], p)``
turns a measured region's counts into bytes on the wire (the formulas are linear in ``nbytes``, so
this works for many calls at once, too).

The ring, for a tensor of N bytes cut into p chunks of N/p:

- reduce-scatter: p - 1 steps; in each, every device sends one chunk to its right-hand neighbour
  and adds the chunk it receives: (p-1)/p * N per device;
- all-gather: p - 1 steps passing the finished chunks around: (p-1)/p of the result, that is
  (p - 1) shards, per device;
- all-reduce = reduce-scatter + all-gather: 2(p-1)/p * N per device, under twice N for any p;
- broadcast: the tensor flows from src around the ring, cut into pieces so that every link works
  at once (a pipeline); every device but the last forwards all of it: N (the last sends nothing).

One device (p = 1) sends nothing, as ``Group`` returns at once.
"""

from __future__ import annotations

from ..comm.group import KINDS  # the collectives that Group counts, in its order

__all__ = ["KINDS", "ring_bytes", "ring_steps", "ring_time", "fit_latency_bandwidth"]


def _check(kind: str, p: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; use one of {KINDS}")
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"p={p!r}: the number of devices must be a positive integer")


def ring_bytes(kind: str, nbytes: float, p: int) -> float:
    """Bytes one device sends in a ring ``kind`` whose input on each device is ``nbytes``.

    all_reduce: 2(p-1)/p * nbytes; reduce_scatter: (p-1)/p * nbytes; all_gather: (p-1) * nbytes
    (nbytes is the shard; the result is p * nbytes); broadcast: nbytes (the most any device sends;
    0 at p = 1). A float, since p need not divide nbytes.
    """
    _check(kind, p)
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes!r} must be >= 0")
    if p == 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (p - 1) * nbytes / p
    if kind == "reduce_scatter":
        return (p - 1) * nbytes / p
    if kind == "all_gather":
        return float((p - 1) * nbytes)
    return float(nbytes)  # broadcast


def ring_steps(kind: str, p: int) -> int:
    """Communication steps one after the other: 2(p - 1) for all_reduce, p - 1 for the others.

    Each step pays the fixed start-up cost (the latency) once; for broadcast this counts the
    pipeline's fill from src to the last device, p - 1 hops.
    """
    _check(kind, p)
    return 2 * (p - 1) if kind == "all_reduce" else p - 1


def ring_time(kind: str, nbytes: float, p: int, *, latency: float, bandwidth: float) -> float:
    """The alpha-beta model: ``ring_steps * latency + ring_bytes / bandwidth``, in seconds.

    ``latency`` (seconds per step) dominates small messages, ``bandwidth`` (bytes per second on
    one link) large ones; chapter 2 fits both to timings of this machine.
    """
    if latency < 0 or bandwidth <= 0:
        raise ValueError(f"latency={latency!r} must be >= 0 and bandwidth={bandwidth!r} > 0")
    return ring_steps(kind, p) * latency + ring_bytes(kind, nbytes, p) / bandwidth


def fit_latency_bandwidth(kind: str, nbytes, seconds, p: int) -> tuple[float, float]:
    """Latency (s per step) and bandwidth (bytes/s) of the alpha-beta model, from measured times.

    A two-point estimate: latency = the smallest message's time / ring_steps; bandwidth = the
    largest's ring_bytes / (its time - ring_steps * latency). The sizes in between are not used.
    ValueError at p = 1, with fewer than two sizes, or if the largest took no longer than the
    smallest.
    """
    _check(kind, p)
    if p == 1:
        raise ValueError("p=1 sends nothing: there is no latency or bandwidth to fit")
    points = sorted(zip(nbytes, seconds))
    if len(points) < 2 or points[0][0] == points[-1][0]:
        raise ValueError("need timings of at least two different sizes")
    (small_n, small_t), (large_n, large_t) = points[0], points[-1]
    steps = ring_steps(kind, p)
    latency = small_t / steps
    rest = large_t - steps * latency
    if rest <= 0:
        raise ValueError(
            f"the largest message ({large_n} bytes) took no longer than the smallest "
            f"({small_n} bytes): measure larger sizes to see the bandwidth"
        )
    return latency, ring_bytes(kind, large_n, p) / rest
