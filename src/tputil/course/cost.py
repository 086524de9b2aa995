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

When tensor parallelism pays (chapter 8): ``tp_layer_ratio`` is a transformer layer's all-reduce
time over its matrix-product time under TP, ``tp_largest_degree`` the largest p that keeps it at
or below a bound.
"""

from __future__ import annotations

from ..comm.group import KINDS  # the collectives that Group counts, in its order

__all__ = [
    "KINDS",
    "ring_bytes",
    "ring_steps",
    "ring_time",
    "fit_latency_bandwidth",
    "tp_layer_ratio",
    "tp_largest_degree",
]


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

    Each step pays the fixed start-up cost (the latency) once. For broadcast, p - 1 is the
    pipeline's fill from src to the last device: with the tensor in k pieces it takes p - 2 + k
    steps of N/k bytes each, so `ring_time` gives its limit for many cheap pieces, a lower bound.
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
    """Latency (s per step) and bandwidth (bytes/s) of the alpha-beta model, fitted to all measured times.

    The model t = ring_steps * latency + ring_bytes / bandwidth is a line a + b * w in w = ring_bytes.
    The fit minimizes the sum of relative errors |a + b w_i - t_i| / t_i over a >= 0, b > 0: every
    point counts in proportion to its own size (the times span orders of magnitude), and one slow
    outlier moves the line little, as a least-absolute-deviation fit's. Such a fit passes through
    two of the points (or through one and the origin), so it is found exactly by trying them all.
    ValueError at p = 1, with fewer than two sizes, or if the largest message took no longer than
    the smallest.
    """
    _check(kind, p)
    if p == 1:
        raise ValueError("p=1 sends nothing: there is no latency or bandwidth to fit")
    points = sorted(zip((ring_bytes(kind, n, p) for n in nbytes), seconds))
    if len(points) < 2 or points[0][0] == points[-1][0]:
        raise ValueError("need timings of at least two different sizes")
    if any(t <= 0 for _, t in points):
        raise ValueError(f"every time must be positive: {[t for _, t in points]}")
    if points[-1][1] <= points[0][1]:
        raise ValueError(
            "the largest message took no longer than the smallest: measure larger sizes to see the bandwidth"
        )

    def error(a, b):
        return sum(abs(a + b * w - t) / t for w, t in points)

    candidates = [(0.0, t / w) for w, t in points if w > 0]  # through the origin and one point
    for i, (w1, t1) in enumerate(points):
        for w2, t2 in points[i + 1 :]:
            if w2 > w1 and t2 > t1:
                b = (t2 - t1) / (w2 - w1)
                candidates.append((max(t1 - b * w1, 0.0), b))
    a, b = min(candidates, key=lambda ab: error(*ab))
    return a / ring_steps(kind, p), 1.0 / b


def tp_layer_ratio(n_embd: int, p: int, *, bytes_per_number: float, flops: float, bandwidth: float) -> float:
    """All-reduce time over matrix time of one transformer layer's forward under TP, bandwidth term only.

    Per token, a rank does 24 C^2 / p FLOPs of matrix products (c_attn 3C^2, attn.c_proj C^2, c_fc
    4C^2, mlp.c_proj 4C^2 multiply-adds; the attention scores' 4 T C are left out) at `flops` per
    second, and sends 2 ring all-reduces of C numbers: 4 (p-1)/p * C * bytes_per_number bytes at
    `bandwidth` bytes per second. The ratio is (p - 1) * bytes_per_number * flops / (6 C bandwidth):
    B * T cancels. The backward pass does twice the matrix work and as many all-reduces of the same
    size: its ratio is half this one. Latency is not included (see `ring_time`).
    """
    if n_embd <= 0 or p < 1 or bytes_per_number <= 0 or flops <= 0 or bandwidth <= 0:
        raise ValueError(
            f"need n_embd > 0, p >= 1 and positive sizes and rates: n_embd={n_embd}, p={p}, "
            f"bytes_per_number={bytes_per_number}, flops={flops}, bandwidth={bandwidth}"
        )
    return (p - 1) * bytes_per_number * flops / (6 * n_embd * bandwidth)


def tp_largest_degree(n_embd: int, *, bytes_per_number: float, flops: float, bandwidth: float, ratio: float = 1.0):
    """The largest p with `tp_layer_ratio` <= ratio: 1 + floor(ratio * 6 C bandwidth / (bytes * flops)).

    ratio 1: the all-reduces take no longer than the matrix products, so p ranks run a layer at
    least p/2 times as fast as one (with no overlap of the two).
    """
    if ratio <= 0:
        raise ValueError(f"ratio={ratio} must be > 0")
    return 1 + int(ratio * 6 * n_embd * bandwidth // (bytes_per_number * flops))
