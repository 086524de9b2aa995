"""tputil.course.ch08_real_processes, chapter 8's rank functions: on threads (fast) and once on two real processes.

The chapter's claim is "same code, same numbers": the rank functions run unchanged on
`run_threads` and on `run_processes`, and at p = 2 the two agree bit for bit (each rank does the
same arithmetic, and an all-reduce of two addends is a + b in either order). The real-process
test spawns once (a few seconds) and checks that, the counts and the environment together.
"""

import os
import time

import pytest
import torch

from tp_helpers import FLOAT32, make_gpt
from tputil.comm import SingleGroup, run_threads
from tputil.course import ch08_real_processes as procs
from tputil.launch import run_processes
from tputil.model import GPTConfig

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)


def _batch(n_vocab=64, B=2, T=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, n_vocab, (B, T), generator=g), torch.randint(0, n_vocab, (B, T), generator=g)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_tp_forward_matches_dense_and_counts_two_all_reduces_per_layer(p):
    dense = make_gpt().eval()
    idx, targets = _batch()
    with torch.no_grad():
        logits, loss = dense(idx, targets)
    results = run_threads(procs.tp_forward, p, dense, idx, targets)
    L, (B, T), C = dense.config.n_layer, idx.shape, dense.config.n_embd
    for r, out in enumerate(results):
        assert (out["rank"], out["world_size"]) == (r, p)
        torch.testing.assert_close(out["logits"], logits, **FLOAT32)
        torch.testing.assert_close(out["loss"], loss, **FLOAT32)
        if p == 1:
            assert out["calls"] == {} and out["shapes"] == []
        else:
            assert out["calls"] == {"all_reduce": 2 * L}
            assert out["bytes"] == {"all_reduce": 2 * L * B * T * C * 4}
            assert out["shapes"] == [(B, T, C)] * (2 * L)
        assert torch.equal(out["logits"], results[0]["logits"])  # the same bits on every rank


def _three_collectives_timed(group):
    group.all_reduce(torch.ones(3))  # before the block: not timed
    with procs.timed_all_reduces(group) as spans:
        group.all_reduce(torch.ones(3))
        group.all_gather(torch.ones(3))  # not an all-reduce: timed by the group, not a span
        group.all_reduce(torch.ones(3), op="max")
    group.all_reduce(torch.ones(3))  # after it: not timed
    log = group.stats.log
    return spans, [(r.kind, r.start is not None, r.seconds is not None) for r in log], log[1].start


def test_timed_all_reduces_reads_each_call_from_the_group_records():
    for spans, timed, first_start in run_threads(_three_collectives_timed, 2):
        assert len(spans) == 2 and all(a <= b for a, b in spans) and spans[0][1] <= spans[1][0]
        assert spans[0][0] == first_start  # the group's own record of the call
        assert timed == [
            ("all_reduce", False, False),
            ("all_reduce", True, True),
            ("all_gather", True, True),
            ("all_reduce", True, True),
            ("all_reduce", False, False),
        ]
    single = SingleGroup()
    with procs.timed_all_reduces(single) as spans:
        single.all_reduce(torch.ones(1))
    assert spans == []  # one rank: nothing is communicated


def test_time_forward_is_positive_and_the_same_on_every_rank():
    dense, idx = procs.seeded_gpt_and_batch(TINY, 2, 8)
    assert procs.time_forward(dense, idx, reps=2, warmup=0) > 0
    from tputil.tp_model import TPGPT

    times = run_threads(lambda g: procs.time_forward(TPGPT.from_dense(dense, group=g), idx, group=g, reps=3), 2)
    assert times[0] == times[1] > 0
    with pytest.raises(ValueError, match="reps=0 must be >= 1"):
        procs.time_forward(dense, idx, reps=0)


def test_seeded_gpt_and_batch_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    (a, x), (b, y) = procs.seeded_gpt_and_batch(TINY, 2, 8), procs.seeded_gpt_and_batch(TINY, 2, 8)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(x, y) and x.shape == (2, 8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c, _ = procs.seeded_gpt_and_batch(TINY, 2, 8, seed=1)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_seeded_gpt_and_batch_on_threads_gives_every_rank_the_same_model():
    # the ranks of run_threads share the process's generator: built at the same time, they must not mix draws
    torch.manual_seed(123)
    before = torch.get_rng_state()
    want = procs.seeded_gpt_and_batch(TINY, 2, 8)[0]
    built = run_threads(lambda g: [procs.seeded_gpt_and_batch(TINY, 2, 8)[0] for _ in range(3)], 4)
    assert torch.equal(torch.get_rng_state(), before)
    for models in built:
        for model in models:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), want.parameters()))


def test_profile_forward_sees_the_matmuls():
    dense, idx = procs.seeded_gpt_and_batch(TINY, 2, 8)
    table, names = procs.profile_forward(dense, idx)
    assert "aten::addmm" in names or "aten::mm" in names
    assert "Self CPU" in table


def test_tp_tour_on_threads():
    dense = make_gpt().eval()
    idx, targets = _batch()
    out = run_threads(procs.tp_tour, 2, dense, idx, targets, [(TINY, 2, 8)], 2)
    for r, o in enumerate(out):
        assert o["forward"]["rank"] == r and o["pid"] == os.getpid() and o["backend"] is None
        (timing,) = o["timing"]
        assert timing["forward"] > 0 and len(timing["all_reduces"]) == 2 * TINY.n_layer
        fastest, slowest = timing["forward_range"]
        assert 0 < fastest <= timing["forward"] <= slowest and timing["all_reduce"] > 0
        spans = timing["all_reduces"]  # from the group's timed records: in order, inside the pass
        assert all(0 <= a <= b <= timing["one_pass"] for a, b in spans)
        assert all(b <= c for (_, b), (c, _) in zip(spans, spans[1:]))
    assert out[0]["profile"] is not None and out[1]["profile"] is None
    assert any("all_reduce" in name or "Reduce" in name for name in out[0]["profile"][1])


def test_tp_tour_on_one_rank_has_no_all_reduce_spans():
    dense = make_gpt().eval()
    idx, targets = _batch()
    (timing,) = procs.tp_tour(SingleGroup(), dense, idx, targets, [(TINY, 2, 8)], 2)["timing"]
    assert timing["all_reduces"] == [] and timing["one_pass"] > 0


@pytest.mark.slow
def test_on_two_real_processes_the_same_bits_as_on_threads():
    dense = make_gpt().eval()
    idx, targets = _batch()
    threads = run_threads(procs.tp_forward, 2, dense, idx, targets)
    start = time.monotonic()
    real = run_processes(procs.tp_tour, 2, dense, idx, targets, [(TINY, 2, 8)], 2, backend="gloo", timeout=120.0)
    assert time.monotonic() - start < 120.0
    for r, (o, t) in enumerate(zip(real, threads)):
        f = o["forward"]
        assert torch.equal(f["logits"], t["logits"]) and torch.equal(f["loss"], t["loss"])
        assert f["calls"] == t["calls"] == {"all_reduce": 2 * dense.config.n_layer}
        assert f["bytes"] == t["bytes"] and f["shapes"] == t["shapes"]
        assert o["backend"] == "gloo" and o["pid"] != os.getpid()
        assert o["env"]["RANK"] == o["env"]["LOCAL_RANK"] == str(r) and o["env"]["WORLD_SIZE"] == "2"
        assert o["env"]["MASTER_ADDR"] == "127.0.0.1" and o["env"]["MASTER_PORT"].isdigit()
        assert len(o["timing"][0]["all_reduces"]) == 2 * TINY.n_layer
    names = real[0]["profile"][1]
    assert any("all_reduce" in n or "allreduce" in n for n in names)


@pytest.mark.slow
def test_transport_tour_on_shared_memory_matches_threads_and_reports_a_mismatch():
    dense = make_gpt().eval()
    idx, targets = _batch()
    threads = run_threads(procs.tp_forward, 2, dense, idx, targets)
    real = run_processes(
        procs.transport_tour,
        2,
        dense,
        idx,
        targets,
        [4, 4096],
        [(TINY, 2, 8)],
        2,
        backend="gloo",
        timeout=120.0,
        shm=True,
    )
    for o, t in zip(real, threads):
        f = o["forward"]
        assert o["kind"] == "ShmGroup"
        assert torch.equal(f["logits"], t["logits"]) and torch.equal(f["loss"], t["loss"])
        assert f["calls"] == t["calls"] and f["bytes"] == t["bytes"]
        assert len(o["all_reduce"]) == 2 and len(o["timing"]) == 1
        assert all(set(x) == {"gloo", "shm"} and min(x.values()) > 0 for x in o["all_reduce"] + o["timing"])
        assert "rank 0: 3 x torch.float32 (sum); rank 1: 4 x torch.float32 (sum)" in o["mismatch"]
