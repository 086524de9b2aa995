"""Tests for tputil.course.cost: the ring formulas of chapter 2, checked against a ring simulated here.

The simulation moves real chunks between per-device lists, one step at a time, and counts the
bytes each device sends; the formulas must match those counts, and the result must match
tputil.course.lists (so the simulated ring is a real all-reduce, not just a byte counter).
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tputil.course import cost, lists


def simulated_ring(kind, xs):
    """Run a ring `kind` on per-device lists; return (what each device ends with, bytes each sent)."""
    p = len(xs)
    sent = [0] * p
    if kind == "broadcast":  # src 0, pipelined along 0 -> 1 -> ... -> p-1: all but the last forward it
        out = [xs[0].clone() for _ in range(p)]
        for r in range(p - 1):
            sent[r] += xs[0].numel() * xs[0].element_size()
        return out, sent
    if kind == "all_gather":  # xs are shards; device r starts with its own in slot r
        chunks = [[x.clone() if i == r else None for i, x in enumerate(xs)] for r in range(p)]
    else:
        chunks = [list(x.clone().chunk(p)) for x in xs]
    if kind in ("all_reduce", "reduce_scatter"):
        for step in range(p - 1):  # device r sends chunk (r - step) % p to r + 1, which adds it
            msgs = [(r, (r - step) % p, chunks[r][(r - step) % p].clone()) for r in range(p)]
            for r, c, t in msgs:
                sent[r] += t.numel() * t.element_size()
                chunks[(r + 1) % p][c] = chunks[(r + 1) % p][c] + t
        # device r now holds the finished chunk (r + 1) % p
        if kind == "reduce_scatter":
            return [chunks[(r - 1) % p][r] for r in range(p)], sent
        owner = [(r + 1) % p for r in range(p)]
    else:
        owner = list(range(p))
    for step in range(p - 1):  # device r passes on the finished chunk it got most recently
        msgs = [(r, (owner[r] - step) % p, chunks[r][(owner[r] - step) % p]) for r in range(p)]
        for r, c, t in msgs:
            sent[r] += t.numel() * t.element_size()
            chunks[(r + 1) % p][c] = t.clone()
    return [torch.cat(c) for c in chunks], sent


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 8), n=st.integers(1, 5), seed=st.integers(0, 10_000), kind=st.sampled_from(cost.KINDS))
def test_formula_matches_the_bytes_a_simulated_ring_sends(p, n, seed, kind):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(-9, 10, (n * p,), generator=g).float() for _ in range(p)]  # exact sums
    out, sent = simulated_ring(kind, xs)
    expected = {
        "all_reduce": lists.all_reduce,
        "reduce_scatter": lists.reduce_scatter,
        "all_gather": lists.all_gather,
        "broadcast": lists.broadcast,
    }[kind](xs)
    assert all(torch.equal(o, e) for o, e in zip(out, expected))
    nbytes = xs[0].numel() * xs[0].element_size()
    assert max(sent) == cost.ring_bytes(kind, nbytes, p)
    if kind != "broadcast":
        assert len(set(sent)) == 1  # the ring spreads the work evenly


@pytest.mark.parametrize("p", [2, 4, 8])
def test_all_reduce_is_reduce_scatter_plus_all_gather(p):
    n = 3 * 2**20
    assert cost.ring_bytes("all_reduce", n, p) == (
        cost.ring_bytes("reduce_scatter", n, p) + cost.ring_bytes("all_gather", n // p, p)
    )
    assert cost.ring_bytes("all_reduce", n, p) == 2 * (p - 1) / p * n < 2 * n
    assert cost.ring_steps("all_reduce", p) == 2 * (p - 1)


def test_the_table_of_chapter_2():
    mib = 2**20
    assert [cost.ring_bytes("all_reduce", mib, p) / mib for p in (2, 4, 8)] == [1.0, 1.5, 1.75]
    assert [cost.ring_bytes("reduce_scatter", mib, p) / mib for p in (2, 4, 8)] == [0.5, 0.75, 0.875]
    assert [cost.ring_bytes("all_gather", mib // p, p) / mib for p in (2, 4, 8)] == [0.5, 0.75, 0.875]
    assert [cost.ring_bytes("broadcast", mib, p) / mib for p in (2, 4, 8)] == [1.0, 1.0, 1.0]


def test_one_device_sends_nothing():
    for kind in cost.KINDS:
        assert cost.ring_bytes(kind, 1000, 1) == 0.0
        assert cost.ring_steps(kind, 1) == 0
        assert cost.ring_time(kind, 1000, 1, latency=1e-3, bandwidth=1e9) == 0.0


def test_ring_time_is_latency_plus_bytes_over_bandwidth():
    t = cost.ring_time("all_reduce", 4 * 10**6, 4, latency=1e-4, bandwidth=1e9)
    assert t == pytest.approx(6 * 1e-4 + 6 * 10**6 / 1e9)


def test_errors_say_what_to_change():
    with pytest.raises(ValueError, match=r"unknown collective 'allreduce'; use one of"):
        cost.ring_bytes("allreduce", 10, 2)
    with pytest.raises(ValueError, match=r"p=0: the number of devices must be a positive integer"):
        cost.ring_steps("all_gather", 0)
    with pytest.raises(ValueError, match=r"nbytes=-1 must be >= 0"):
        cost.ring_bytes("broadcast", -1, 2)
    with pytest.raises(ValueError, match=r"bandwidth=0 > 0"):
        cost.ring_time("broadcast", 1, 2, latency=0.0, bandwidth=0)


def test_fit_recovers_the_model_it_was_given():
    sizes = [4 * 4**k for k in range(14)]  # 4 B to 256 MiB
    for p in (2, 4):
        times = [cost.ring_time("all_reduce", n, p, latency=2e-4, bandwidth=5e8) for n in sizes]
        latency, bandwidth = cost.fit_latency_bandwidth("all_reduce", sizes, times, p)
        assert latency == pytest.approx(2e-4, rel=1e-9)  # the line through the points: exact
        assert bandwidth == pytest.approx(5e8, rel=1e-9)


def test_fit_uses_every_point_and_shrugs_off_outliers():
    """A slow first call (a warm-up the measurement missed) and one stray point leave the fit where the
    other points put it; a fit from the smallest and largest sizes alone would take the first at face
    value and put the latency 3.6 times too high."""
    sizes = [4 * 2**10 * 2**k for k in range(13)]  # 4 KiB to 16 MiB, as chapter 2 measures
    times = [cost.ring_time("all_reduce", n, 2, latency=2.5e-4, bandwidth=1.2e9) for n in sizes]
    times[0] *= 3.6
    times[8] *= 2.0
    latency, bandwidth = cost.fit_latency_bandwidth("all_reduce", sizes, times, 2)
    assert latency == pytest.approx(2.5e-4, rel=1e-9)
    assert bandwidth == pytest.approx(1.2e9, rel=1e-9)


def test_fit_refuses_data_without_both_regimes():
    with pytest.raises(ValueError, match=r"at least two different sizes"):
        cost.fit_latency_bandwidth("all_reduce", [4], [1e-3], 2)
    with pytest.raises(ValueError, match=r"measure larger sizes"):
        cost.fit_latency_bandwidth("all_reduce", [4, 8], [1e-3, 1e-3], 2)
    with pytest.raises(ValueError, match=r"p=1 sends nothing"):
        cost.fit_latency_bandwidth("all_reduce", [4, 8], [1e-3, 2e-3], 1)


def test_tp_layer_ratio_is_the_counted_time_ratio():
    """The closed form equals all-reduce time over matrix time computed from the counts it stands for."""
    for C, p, s, F, beta in [(768, 2, 2, 989e12, 450e9), (4096, 8, 2, 989e12, 64e9), (64, 4, 4, 5e10, 1e9)]:
        B, T = 3, 17  # any batch: it cancels
        matrix_flops = 2 * B * T * (3 * C * C + C * C + 4 * C * C + 4 * C * C) / p
        comm_bytes = 2 * cost.ring_bytes("all_reduce", B * T * C * s, p)
        ratio = (comm_bytes / beta) / (matrix_flops / F)
        assert cost.tp_layer_ratio(C, p, bytes_per_number=s, flops=F, bandwidth=beta) == pytest.approx(ratio)
        assert cost.tp_layer_ratio(C, 1, bytes_per_number=s, flops=F, bandwidth=beta) == 0.0


def test_tp_largest_degree_is_the_edge_of_the_ratio():
    for C, s, F, beta in [(768, 2, 989e12, 450e9), (4096, 2, 989e12, 450e9), (8192, 2, 312e12, 300e9)]:
        kw = dict(bytes_per_number=s, flops=F, bandwidth=beta)
        q = cost.tp_largest_degree(C, **kw)
        assert cost.tp_layer_ratio(C, q, **kw) <= 1.0 < cost.tp_layer_ratio(C, q + 1, **kw)
    with pytest.raises(ValueError, match="p=0"):
        cost.tp_layer_ratio(64, 0, bytes_per_number=4, flops=1.0, bandwidth=1.0)
