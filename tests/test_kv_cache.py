"""Generation with a KV cache (chapter 13): the same tokens as without it, 1/p of it per rank.

Dense and tensor-parallel (threads, p in 1, 2, 4), float64 and float32, within and past
block_size (where generate refills the cache from the cropped window); the cache's bytes
against the formula; the collectives of one new token; bad input.
"""

import pytest
import torch

from tp_helpers import FLOAT64, assert_no_close_calls, make_gpt
from tputil.bench import kv_cache as kv_bench
from tputil.comm import SingleGroup, run_threads
from tputil.kv_cache import KVCache, kv_cache_bytes_per_rank
from tputil.model import causal_attention, generate
from tputil.tp_model import TPGPT

B, PROMPT, NEW = 2, 4, 40  # 44 tokens > SMALL's block_size 32: the window slides for the last 12


def prompt(seed=0):
    return torch.randint(0, 64, (B, PROMPT), generator=torch.Generator().manual_seed(seed))


def test_cached_keys_offset_the_causal_mask():
    """Queries for the last Tq of Tk positions give the last Tq rows of the full attention."""
    q, k, v = torch.randn(3, 2, 3, 7, 4, dtype=torch.float64)  # each (B, nh, T, hs)
    full = causal_attention(q, k, v)
    for tq in (1, 3, 7):
        torch.testing.assert_close(causal_attention(q[:, :, -tq:], k, v), full[:, :, -tq:], **FLOAT64)
    wrong = causal_attention(q[:, :, -3:], k[:, :, -3:], v[:, :, -3:])  # without the cached keys
    assert (wrong - full[:, :, -3:]).abs().max() > 1e-3


def test_feeding_a_sequence_in_pieces_gives_the_full_forward_logits():
    dense = make_gpt(dtype=torch.float64)
    idx = torch.randint(0, 64, (B, 32))
    full, _ = dense(idx)
    cache, pieces = KVCache(dense.config.n_layer), []
    for a, b in [(0, 5), (5, 6), (6, 20), (20, 32)]:
        pieces.append(dense(idx[:, a:b], kv_cache=cache)[0])
        assert cache.length == b
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **FLOAT64)


class Counting(torch.nn.Module):
    """A model's forward, recording how many positions each call feeds."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.fed = model, model.config, []

    def forward(self, idx, **kwargs):
        self.fed.append(idx.size(1))
        return self.model(idx, **kwargs)


def test_the_cache_feeds_one_token_per_step_then_refills_past_block_size():
    dense = make_gpt(dtype=torch.float64)
    counting = Counting(dense)
    out = generate(counting, prompt(), NEW)
    bs = dense.config.block_size
    # the prompt, then one token per step until the context fills the window, then the window
    assert counting.fed == [PROMPT] + [1] * (bs - PROMPT) + [bs] * (PROMPT + NEW - 1 - bs)
    counting.fed.clear()
    assert torch.equal(generate(counting, prompt(), NEW, kv_cache=False), out)
    assert counting.fed == [min(t, bs) for t in range(PROMPT, PROMPT + NEW)]  # no cache: the whole context


def test_a_rolling_cache_is_not_the_cropped_context():
    """Why generate refills instead of rolling: keeping the old keys past block_size changes the logits."""
    dense = make_gpt(dtype=torch.float64)
    bs = dense.config.block_size
    idx = torch.randint(0, 64, (B, bs + 1))
    cropped, _ = dense(idx[:, 1:])  # what the no-cache generate sees: positions 0 to bs - 1
    cache = KVCache(dense.config.n_layer)
    dense(idx[:, :bs], kv_cache=cache)
    for kv in cache.layers:  # roll: drop the oldest position, keep the others' keys from their old positions
        kv.k, kv.v = kv.k[:, :, 1:], kv.v[:, :, 1:]
    rolled, _ = dense(idx[:, bs:], kv_cache=cache)  # the new token at position bs - 1
    assert (rolled[:, -1] - cropped[:, -1]).abs().max() > 1e-8  # float64 rounding is 1e-16; this is 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_tp_tokens_equal_the_no_cache_and_the_dense_tokens(p, dtype, vocab_parallel):
    dense = make_gpt(dtype=dtype)
    idx = prompt()
    expected = dense.generate(idx, NEW, kv_cache=False)
    if dtype == torch.float32:
        assert_no_close_calls(dense, expected, PROMPT)  # the premise of comparing float32 tokens
    assert torch.equal(dense.generate(idx, NEW), expected)

    def both(group):
        model = TPGPT.from_dense(dense, group=group, vocab_parallel=vocab_parallel)
        return model.generate(idx, NEW), model.generate(idx, NEW, kv_cache=False)

    for cached, uncached in run_threads(both, p):
        assert torch.equal(cached, expected) and torch.equal(uncached, expected)


def test_a_prompt_longer_than_block_size_and_sampling_agree_too():
    dense = make_gpt(dtype=torch.float64)
    long = torch.randint(0, 64, (B, 40))  # cropped from the first step
    assert torch.equal(dense.generate(long, 5), dense.generate(long, 5, kv_cache=False))
    drawn = [
        dense.generate(prompt(), 30, greedy=False, top_k=10, generator=torch.Generator().manual_seed(1), kv_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(*drawn)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_each_rank_caches_its_own_heads_one_pth_of_the_bytes(p):
    dense = make_gpt()
    config, T = dense.config, 11
    idx = torch.randint(0, 64, (B, T))

    def fill(group):
        cache = KVCache(config.n_layer)
        TPGPT.from_dense(dense, group=group)(idx, kv_cache=cache)
        return cache

    dense_cache = KVCache(config.n_layer)
    dense(idx, kv_cache=dense_cache)
    formula = kv_cache_bytes_per_rank(config, B, T, p, torch.float32)
    assert formula == 2 * config.n_layer * B * T * (config.n_embd // p) * 4
    hs, heads = config.head_size, config.n_head // p
    for rank, cache in enumerate(run_threads(fill, p)):
        assert cache.nbytes() == formula == dense_cache.nbytes() // p
        for kv, dense_kv in zip(cache.layers, dense_cache.layers):
            assert kv.k.shape == kv.v.shape == (B, heads, T, hs)
            own = slice(rank * heads, (rank + 1) * heads)  # this rank's heads are the dense cache's heads
            torch.testing.assert_close(kv.k, dense_kv.k[:, own], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(kv.v, dense_kv.v[:, own], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_a_new_token_costs_two_all_reduces_of_b_c_per_layer(vocab_parallel):
    dense = make_gpt()
    L, C = dense.config.n_layer, dense.config.n_embd
    idx = torch.randint(0, 64, (B, 10))

    def one_token(group):
        model = TPGPT.from_dense(dense, group=group, vocab_parallel=vocab_parallel)
        cache = KVCache(L)
        model(idx[:, :9], kv_cache=cache)
        with group.stats.measure() as cached:
            model(idx[:, 9:], kv_cache=cache)
        with group.stats.measure() as uncached:
            model(idx)
        return cached, uncached

    n = 2 * L + (1 if vocab_parallel else 0)  # + the vocabulary-parallel embedding's
    for cached, uncached in run_threads(one_token, 2):
        assert cached.calls == {"all_reduce": n} and cached.bytes == {"all_reduce": n * B * 1 * C * 4}
        assert [r.shape for r in cached.log] == [(B, 1, C)] * n
        assert uncached.calls == cached.calls and uncached.bytes == {"all_reduce": 10 * n * B * C * 4}  # T times more


def test_bad_caches_are_refused_before_any_communication():
    dense = make_gpt()
    idx = torch.randint(0, 64, (B, 6))
    cache = KVCache(dense.config.n_layer)
    dense(idx, kv_cache=cache)
    with pytest.raises(ValueError, match="holds a batch of 2 sequences, not 3: use one cache per batch"):
        dense(torch.randint(0, 64, (3, 1)), kv_cache=cache)
    with pytest.raises(ValueError, match="holds 6 positions, and 27 more exceed block_size 32: clear"):
        dense(torch.randint(0, 64, (B, 27)), kv_cache=cache)
    with pytest.raises(ValueError, match="a KVCache of 3 layers for a model of 4"):
        dense(idx, kv_cache=KVCache(3))

    def from_another_p(group):  # the dense (p = 1) cache holds all 12 heads; a rank of 2 has 6
        model = TPGPT.from_dense(dense, group=group)
        with group.stats.measure() as m, pytest.raises(ValueError, match="holds 12 heads per layer, this model 6"):
            model(idx[:, :1], kv_cache=cache)
        return m.total_calls

    assert run_threads(from_another_p, 2) == [0, 0]
    cache.clear()
    assert cache.length == 0 and cache.nbytes() == 0


def test_a_sequence_parallel_model_refuses_the_cache():
    """Asked for a cache, it refuses; by default it generates without one (the same tokens)."""
    dense = make_gpt()

    def refused(group):
        model = TPGPT.from_dense(dense, group=group, sequence_parallel=True)
        with pytest.raises(ValueError, match="generate with a model built without sequence_parallel"):
            model.generate(prompt(), 2, kv_cache=True)
        fed = []
        model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs.get("kv_cache")), with_kwargs=True)
        out = model.generate(prompt(), 2)
        assert fed == [None, None], fed  # the default: the whole window, twice, no cache
        return torch.equal(out, dense.generate(prompt(), 2))

    assert all(run_threads(refused, 2))


def test_both_models_generate_with_the_cache_by_default():
    dense = make_gpt()
    for model in (dense, TPGPT.from_dense(dense, group=SingleGroup())):
        fed = []
        model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs.get("kv_cache")), with_kwargs=True)
        model.generate(prompt(), 3)
        assert len(fed) == 3 and all(isinstance(c, KVCache) for c in fed) and fed[0] is fed[2]
        model.generate(prompt(), 3, kv_cache=False)
        assert fed[3:] == [None] * 3


def test_the_benchmark_refuses_to_time_past_block_size():
    with pytest.raises(ValueError, match="generate at most 240 tokens"):
        kv_bench.run(prompt=16, new_tokens=241, block_size=256)


@pytest.mark.slow
def test_the_benchmark_runs_and_reports_the_four_ways(no_leftovers):
    result = kv_bench.run(p=2, n_layer=1, n_embd=32, n_head=2, block_size=16, prompt=4, new_tokens=6, rounds=1)
    rows = [(r["model"], r["p"], r["kv_cache"]) for r in result["rows"]]
    assert rows == [("dense", 1, False), ("dense", 1, True), ("TP", 2, False), ("TP", 2, True)]
    assert all(r["tokens_per_second"] > 0 and isinstance(r["same_tokens"], bool) for r in result["rows"])
    assert set(result["speedup"]) == {"dense", "TP"}
    lines = kv_bench.table(result).splitlines()
    assert len(lines) == 2 + 4 and "cache speed-up" in lines[1]
