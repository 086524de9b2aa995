"""Chapter 10: the vocabulary-parallel embedding, head and cross-entropy, padding, and what they cost.

Tolerances as in tp_helpers: float64 1e-12 where the check is meant to be exact, float32 1e-5 (the
parallel loss sums exp over p shards and then over ranks, a different order than F.cross_entropy).
Vocabularies of 67 (prime: no p > 1 divides it) and 5 (at p = 4 the last rank owns only padding)
exercise the padding; 64 divides every p and needs none.
"""

import pytest
import torch
from hypothesis import given, strategies as st
from torch.nn import functional as F

from tp_helpers import DEGREES, FLOAT32, FLOAT64, PROPERTY, assert_grads_are_shards, assert_no_close_calls, make_gpt
from tputil.comm import RankError, SingleGroup, run_threads
from tputil.layers import ColumnParallelLinear, VocabParallelEmbedding
from tputil.loss import vocab_parallel_argmax, vocab_parallel_cross_entropy
from tputil.model import GPTConfig
from tputil.shard import (
    GPT_TP_PLAN,
    GPT_VOCAB_TP_PLAN,
    Replicate,
    VocabShard,
    gather_state_dict,
    pad_vocab_size,
    shard_shapes,
    shard_state_dict,
    vocab_parallel_plan,
    vocab_range,
)
from tputil.tp_model import TPGPT, VocabParallelTPGPT, param_counts_per_rank

B, T, C = 2, 16, 48


def shard_of(full, group, padded):
    """This rank's columns of full (..., padded), as a fresh leaf that records its gradient."""
    start, end = vocab_range(padded, group.rank, group.world_size)
    return full[..., start:end].detach().clone().requires_grad_()


# ---------------------------------------------------------------------------- padding


def test_pad_vocab_size_by_hand():
    assert pad_vocab_size(50257, 1) == 50257  # one rank: nothing to split
    assert pad_vocab_size(50257, 2) == 50258  # GPT-2's 50257 = 29 * 1733 divides by no small p
    assert pad_vocab_size(50257, 4) == 50260
    assert pad_vocab_size(50304, 4) == 50304 and pad_vocab_size(50304, 3) == 50304  # nanoGPT's padding suffices
    assert pad_vocab_size(50257, 2, multiple=128) == 50432  # Megatron-LM's rule: a multiple of 128 * p
    assert pad_vocab_size(67, 3) == 69 and pad_vocab_size(5, 4) == 8
    with pytest.raises(ValueError, match=r"pad_vocab_size: p=0: it must be a positive integer"):
        pad_vocab_size(67, 0)


@PROPERTY
@given(v=st.integers(1, 300), p=st.integers(1, 8), multiple=st.sampled_from([1, 2, 64, 128]))
def test_padding_is_the_smallest_multiple_and_the_ranges_tile_it(v, p, multiple):
    padded = pad_vocab_size(v, p, multiple=multiple)
    assert padded >= v and padded % (multiple * p) == 0 and padded - v < multiple * p
    ranges = [vocab_range(padded, r, p) for r in range(p)]
    assert ranges[0][0] == 0 and ranges[-1][1] == padded
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order


# ---------------------------------------------------------------------------- the embedding


@pytest.mark.parametrize("p", DEGREES)
@pytest.mark.parametrize("vocab", [64, 67, 5])
def test_embedding_matches_dense_with_one_all_reduce(p, vocab):
    torch.manual_seed(0)
    dense = torch.nn.Embedding(vocab, C).double()
    ids = torch.randint(0, vocab, (B, T))
    grad_out = torch.randn(B, T, C, dtype=torch.float64)
    y = dense(ids)
    y.backward(grad_out)
    padded = pad_vocab_size(vocab, p)
    dense_grad = torch.cat([dense.weight.grad, torch.zeros(padded - vocab, C, dtype=torch.float64)])

    def fn(group):
        emb = VocabParallelEmbedding.from_dense(dense, group=group)
        with group.stats.measure() as m:
            out = emb(ids)
        out.backward(grad_out)
        start, end = vocab_range(padded, group.rank, p)
        assert (emb.vocab_start, emb.vocab_end, emb.weight.shape) == (start, end, (padded // p, C))
        torch.testing.assert_close(emb.weight.grad, dense_grad[start:end], **FLOAT64)  # padding rows: zero grad
        return out, m

    for out, m in run_threads(fn, p):
        assert torch.equal(out, y)  # every id's row comes from its one owner; the others add exact zeros
        assert m.calls == ({} if p == 1 else {"all_reduce": 1})
        assert m.bytes == ({} if p == 1 else {"all_reduce": B * T * C * 8})


@pytest.mark.parametrize(
    "vocab, p, multiple", [(67, 2, 1), (67, 3, 1), (67, 4, 1), (5, 4, 1), (10, 3, 1), (64, 3, 1), (60, 2, 8), (5, 2, 4)]
)
def test_constructor_zeroes_every_padding_row_and_no_real_row(vocab, p, multiple):
    """The docstring's promise: rows beyond the vocabulary are zero, on every rank (a rank may own only padding)."""
    padded = pad_vocab_size(vocab, p, multiple=multiple)
    assert padded > vocab  # every case here has padding

    def fn(group):
        emb = VocabParallelEmbedding(
            vocab, 8, group=group, padded_vocab_size=padded, generator=torch.Generator().manual_seed(0)
        )
        ids = torch.arange(emb.vocab_start, emb.vocab_end)  # (V_pad/p,) the global id of each local row
        return emb.weight.detach(), ids

    for weight, ids in run_threads(fn, p):
        assert torch.equal(weight[ids >= vocab], torch.zeros(int((ids >= vocab).sum()), 8))
        assert (weight[ids < vocab] != 0).any(dim=1).all()  # each real row drawn, not zeroed


def test_embedding_refuses_ids_outside_the_real_vocabulary():
    emb = VocabParallelEmbedding.from_dense(torch.nn.Embedding(67, 4), group=SingleGroup(), padded_vocab_size=68)
    assert emb.weight.shape == (68, 4) and torch.equal(emb.weight[67], torch.zeros(4))
    with pytest.raises(IndexError, match=r"token ids must be in \[0, 67\), got ids in \[0, 67\]"):
        emb(torch.tensor([[0, 67]]))  # 67 is a padding row: it exists, but it is not a token


# ---------------------------------------------------------------------------- the cross-entropy


@PROPERTY
@given(
    p=st.sampled_from(DEGREES),
    vocab=st.integers(1, 20),
    multiple=st.sampled_from([1, 2]),
    b=st.integers(1, 3),
    t=st.integers(1, 5),
    ignore=st.floats(0.0, 0.7),
    seed=st.integers(0, 999),
)
def test_loss_and_gradients_equal_f_cross_entropy(p, vocab, multiple, b, t, ignore, seed):
    g = torch.Generator().manual_seed(seed)
    padded = pad_vocab_size(vocab, p, multiple=multiple)
    full = (3 * torch.randn(b, t, padded, generator=g, dtype=torch.float64)).requires_grad_()  # padding not zero
    targets = torch.randint(0, vocab, (b, t), generator=g)
    targets[torch.rand(b, t, generator=g) < ignore] = -1
    targets[0, 0] = vocab - 1  # at least one position counts
    expected = F.cross_entropy(full[..., :vocab].reshape(-1, vocab), targets.reshape(-1), ignore_index=-1)
    expected.backward()

    def fn(group):
        shard = shard_of(full, group, padded)
        start = vocab_range(padded, group.rank, p)[0]
        with group.stats.measure() as fwd:
            loss = vocab_parallel_cross_entropy(shard, targets, group=group, vocab_start=start, vocab_size=vocab)
        with group.stats.measure() as bwd:
            loss.backward()
        torch.testing.assert_close(shard.grad, full.grad[..., start : start + shard.size(-1)], **FLOAT64)
        return loss, fwd, bwd

    for loss, fwd, bwd in run_threads(fn, p):
        torch.testing.assert_close(loss, expected, **FLOAT64)
        if p > 1:  # max, target logit, sum of exps: B*T numbers each; backward is local
            assert fwd.calls == {"all_reduce": 3} and fwd.bytes == {"all_reduce": 3 * b * t * 8}
            assert [r.tag.rsplit(".", 1)[1] for r in fwd.log] == ["max", "target_logit", "sum_exp"]
            assert bwd.total_calls == 0


@pytest.mark.parametrize("p", [2, 4])
def test_loss_in_float32_and_with_logits_that_would_overflow_exp(p):
    vocab, padded = 67, pad_vocab_size(67, p)
    full = (10 * torch.randn(4, 8, padded) + 1e4).requires_grad_()  # exp(1e4) is inf in float32
    targets = torch.randint(0, vocab, (4, 8))
    assert not torch.isfinite(full[..., :vocab].exp().sum(-1)).all()  # the naive formula would fail
    expected = F.cross_entropy(full[..., :vocab].reshape(-1, vocab), targets.reshape(-1))
    expected.backward()

    def fn(group):
        shard = shard_of(full, group, padded)
        loss = vocab_parallel_cross_entropy(shard, targets, group=group, vocab_size=vocab)
        loss.backward()
        start = vocab_range(padded, group.rank, p)[0]
        torch.testing.assert_close(shard.grad, full.grad[..., start : start + shard.size(-1)], **FLOAT32)
        return loss

    for loss in run_threads(fn, p):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, expected, **FLOAT32)


def test_loss_reductions_and_all_ignored():
    full = torch.randn(3, 4, 12, dtype=torch.float64)
    targets = torch.randint(0, 12, (3, 4))
    targets[1] = -1

    def fn(group):
        shard = full.chunk(group.world_size, dim=-1)[group.rank]
        none, total = (vocab_parallel_cross_entropy(shard, targets, group=group, reduction=r) for r in ("none", "sum"))
        return none, total, vocab_parallel_cross_entropy(shard, torch.full_like(targets, -1), group=group)

    for none, total, all_ignored in run_threads(fn, 3):
        for ours, reduction in ((none, "none"), (total, "sum")):
            expected = F.cross_entropy(full.transpose(1, 2), targets, ignore_index=-1, reduction=reduction)
            torch.testing.assert_close(ours, expected, **FLOAT64)
        assert torch.isnan(all_ignored)  # 0 / 0, as F.cross_entropy gives
        assert torch.isnan(F.cross_entropy(full.transpose(1, 2), torch.full_like(targets, -1), ignore_index=-1))


def test_padding_must_be_masked_negative_control():
    """Without vocab_size the padded columns count as classes: the loss is no longer the dense one."""
    vocab, p = 67, 4
    padded = pad_vocab_size(vocab, p)  # 68: one padded column, of logit 0 like a zero weight row gives
    full = torch.zeros(2, 8, padded, dtype=torch.float64)
    full[..., :vocab] = torch.randn(2, 8, vocab, dtype=torch.float64)
    targets = torch.randint(0, vocab, (2, 8))
    expected = F.cross_entropy(full[..., :vocab].reshape(-1, vocab), targets.reshape(-1))

    def fn(group):
        shard = full.chunk(p, dim=-1)[group.rank]
        return (
            vocab_parallel_cross_entropy(shard, targets, group=group, vocab_size=vocab),
            vocab_parallel_cross_entropy(shard, targets, group=group),
        )

    for masked, unmasked in run_threads(fn, p):
        torch.testing.assert_close(masked, expected, **FLOAT64)
        assert (unmasked - expected).abs() > 1e-3


def test_loss_refuses_targets_outside_the_vocabulary():
    shard = torch.randn(2, 3, 34)
    with pytest.raises(RankError, match=r"target 67 is not a token id in \[0, 67\) \(nor ignore_index=-1\)"):
        run_threads(lambda g: vocab_parallel_cross_entropy(shard, torch.full((2, 3), 67), group=g, vocab_size=67), 2)
    with pytest.raises(ValueError, match=r"targets of shape \(3, 2\) do not match logits of shape \(2, 3, 34\)"):
        vocab_parallel_cross_entropy(shard, torch.zeros(3, 2, dtype=torch.long), group=SingleGroup())


# ---------------------------------------------------------------------------- the argmax


@pytest.mark.parametrize("p", DEGREES)
@pytest.mark.parametrize("vocab", [67, 5])
def test_argmax_over_shards_equals_torch_argmax(p, vocab):
    padded = pad_vocab_size(vocab, p)
    full = torch.randn(3, 5, padded)
    full[..., vocab:] = 100.0  # padding columns must never win
    full[0, 0] = 0.0  # a tie across all ranks: the first id wins
    full[0, 1, :vocab] = 0.0
    full[0, 1, [vocab // 2, vocab - 1]] = 7.0  # a tie between two ids, on different ranks when p > 1
    expected = full[..., :vocab].argmax(-1)

    def fn(group):
        with group.stats.measure() as m:
            out = vocab_parallel_argmax(full.chunk(p, dim=-1)[group.rank], group=group, vocab_size=vocab)
        return out, m

    for out, m in run_threads(fn, p):
        assert torch.equal(out, expected)
        assert out[0, 0] == 0 and out[0, 1] == vocab // 2
        if p > 1:  # the max (float32), then the smallest winning id (int64)
            assert m.calls == {"all_reduce": 2} and m.bytes == {"all_reduce": 15 * 4 + 15 * 8}


# ---------------------------------------------------------------------------- the whole GPT


@pytest.mark.parametrize("p", DEGREES)
@pytest.mark.parametrize("vocab", [64, 67])
def test_vocab_parallel_gpt_matches_dense_and_counts_its_collectives(p, vocab):
    dense = make_gpt(vocab_size=vocab)
    idx, targets = torch.randint(0, vocab, (B, T)), torch.randint(0, vocab, (B, T))
    logits, loss = dense(idx, targets)
    loss.backward()
    dense_grads = {n: q.grad for n, q in dense.named_parameters()}  # the tied weight once, as transformer.wte.weight
    padded, n = pad_vocab_size(vocab, p), dense.config.n_layer

    def fn(group):
        model = VocabParallelTPGPT.from_dense(dense, group=group)
        with group.stats.measure() as fwd:
            out, tp_loss = model(idx, targets)
        with group.stats.measure() as bwd:
            tp_loss.backward()
        assert_grads_are_shards(model, dense_grads, dense.config, group.rank, p, plan=GPT_VOCAB_TP_PLAN)
        return out, model.gather_logits(out), tp_loss, fwd, bwd

    for out, full, tp_loss, fwd, bwd in run_threads(fn, p):
        assert out.shape == (B, T, padded // p)  # the logits stay sharded over the vocabulary
        torch.testing.assert_close(full, logits, **FLOAT32)
        torch.testing.assert_close(tp_loss, loss, **FLOAT32)
        if p > 1:
            # embedding 1 + blocks 2 per layer, each B*T*C; the loss 3 of B*T; never a gather of the logits
            assert fwd.calls == {"all_reduce": 2 * n + 4}
            assert fwd.bytes == {"all_reduce": (2 * n + 1) * B * T * C * 4 + 3 * B * T * 4}
            assert [r.tag for r in fwd.log][: 2 * n + 1] == ["reduce_from_parallel_region.forward"] * (2 * n + 1)
            # backward: the head's f (dL/dx of B*T*C) and the two f's of every layer; the loss is local
            assert bwd.calls == {"all_reduce": 2 * n + 1}


def test_p_1_is_the_dense_model():
    dense = make_gpt(vocab_size=67)
    model = VocabParallelTPGPT.from_dense(dense, group=SingleGroup())
    idx, targets = torch.randint(0, 67, (B, T)), torch.randint(0, 67, (B, T))
    (out, loss), (logits, dense_loss) = model(idx, targets), dense(idx, targets)
    # rounding only: the row-parallel biases come after their matmuls here, inside them in the dense model
    torch.testing.assert_close(out, logits, **FLOAT32)
    torch.testing.assert_close(loss, dense_loss, **FLOAT32)


@pytest.mark.parametrize("p", DEGREES)
def test_greedy_generation_is_the_dense_models(p):
    dense = make_gpt(vocab_size=67)
    idx = torch.randint(0, 67, (2, 4))
    expected = dense.generate(idx, 36)  # 40 tokens > block_size 32: cropping is exercised too
    assert_no_close_calls(dense, expected, 4)
    n = dense.config.n_layer

    def fn(group):
        model = VocabParallelTPGPT.from_dense(dense, group=group)
        with group.stats.measure() as m:
            out = model.generate(idx, 36)
        return out, m

    for out, m in run_threads(fn, p):
        assert torch.equal(out, expected)
        if p > 1:  # per token: embedding 1 + blocks 2n, then the argmax 2 (of B numbers)
            assert m.calls == {"all_reduce": 36 * (2 * n + 3)}


def test_sampling_is_the_dense_models_given_equal_generators():
    dense = make_gpt(vocab_size=67, dtype=torch.float64)
    idx = torch.randint(0, 67, (2, 4))
    kwargs = dict(greedy=False, temperature=0.8, top_k=20)
    expected = dense.generate(idx, 12, generator=torch.Generator().manual_seed(1), **kwargs)
    fn = lambda g: VocabParallelTPGPT.from_dense(dense, group=g).generate(  # noqa: E731
        idx, 12, generator=torch.Generator().manual_seed(1), **kwargs
    )
    for out in run_threads(fn, 3):
        assert torch.equal(out, expected)


def test_weight_tying_survives_adamw_steps():
    dense = make_gpt(vocab_size=67, n_layer=2, dtype=torch.float64)
    batches = [(torch.randint(0, 67, (B, T)), torch.randint(0, 67, (B, T))) for _ in range(3)]
    p, padded = 3, pad_vocab_size(67, 3)

    def train(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        for idx, targets in batches:
            _, loss = model(idx, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return opt

    def fn(group):
        model = VocabParallelTPGPT.from_dense(dense, group=group)
        before = model.lm_head.weight.detach().clone()
        opt = train(model)
        return model, before, opt

    results = run_threads(fn, p)
    opt = train(dense)
    dense_tied = torch.cat([dense.lm_head.weight.detach(), torch.zeros(padded - 67, C, dtype=torch.float64)])
    for rank, (model, before, tp_opt) in enumerate(results):
        assert model.lm_head.weight is model.transformer.wte.weight  # one tensor, two names
        assert len(tp_opt.param_groups[0]["params"]) == len(opt.param_groups[0]["params"])  # updated once per step
        assert not torch.equal(model.lm_head.weight, before)  # and it was updated
        start, end = vocab_range(padded, rank, p)
        torch.testing.assert_close(model.lm_head.weight.detach(), dense_tied[start:end], **FLOAT64)
        padding = model.lm_head.weight[max(67 - start, 0) :]  # zero gradient, so AdamW leaves it at 0
        assert torch.equal(padding, torch.zeros_like(padding))
    gathered = gather_state_dict([m.state_dict() for m, _, _ in results], dense.config, plan=GPT_VOCAB_TP_PLAN)
    for name, value in dense.state_dict().items():
        torch.testing.assert_close(gathered[name], value, **FLOAT64, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------- the plan and the state dict


def test_the_vocab_plan_changes_only_the_two_vocabulary_tensors():
    assert list(GPT_VOCAB_TP_PLAN) == list(GPT_TP_PLAN)
    changed = {k for k in GPT_TP_PLAN if GPT_TP_PLAN[k] != GPT_VOCAB_TP_PLAN[k]}
    assert changed == {"transformer.wte.weight", "lm_head.weight"}
    assert GPT_TP_PLAN["lm_head.weight"] == Replicate()  # the default TP GPT is untouched
    assert vocab_parallel_plan(128)["lm_head.weight"] == VocabShard(128)


@pytest.mark.parametrize("p", DEGREES)
@pytest.mark.parametrize("multiple", [1, 128])
def test_shard_and_gather_round_trip_bitwise_through_the_padding(p, multiple):
    dense = make_gpt(vocab_size=67, n_layer=2)
    config, plan = dense.config, vocab_parallel_plan(multiple)
    padded = pad_vocab_size(67, p, multiple=multiple)
    shards = [shard_state_dict(dense.state_dict(), config, r, p, plan=plan) for r in range(p)]
    assert shards[0]["lm_head.weight"].shape == shard_shapes(config, p, plan=plan)["lm_head.weight"] == (padded // p, C)
    gathered = gather_state_dict(shards, config, plan=plan)
    assert all(torch.equal(gathered[k], v) for k, v in dense.state_dict().items())
    models = run_threads(lambda g: VocabParallelTPGPT.from_dense(dense, group=g, multiple=multiple), p)
    assert list(models[0].state_dict()) == list(dense.state_dict())
    gathered = gather_state_dict([m.state_dict() for m in models], config, plan=plan)
    assert all(torch.equal(gathered[k], v) for k, v in dense.state_dict().items())


def test_multiple_128_pads_more_and_still_matches_dense():
    dense = make_gpt(vocab_size=67, n_layer=1)
    idx, targets = torch.randint(0, 67, (B, T)), torch.randint(0, 67, (B, T))
    logits, loss = dense(idx, targets)

    def fn(group):
        model = VocabParallelTPGPT.from_dense(dense, group=group, multiple=128)
        out, tp_loss = model(idx, targets)
        return out.shape, model.gather_logits(out), tp_loss

    for shape, full, tp_loss in run_threads(fn, 2):
        assert shape == (B, T, 128)  # 67 -> 256 = 128 * 2 rows, 128 per rank
        torch.testing.assert_close(full, logits, **FLOAT32)
        torch.testing.assert_close(tp_loss, loss, **FLOAT32)


def test_loading_a_replicated_head_shard_names_the_parameter():
    dense = make_gpt(vocab_size=67)
    shard = shard_state_dict(dense.state_dict(), dense.config, 0, 2)  # GPT_TP_PLAN: wte whole
    with pytest.raises(
        RankError,
        match=r"rank 0: transformer.wte.weight: expected shape \(34, 48\) "
        r"for a shard at p=2, got \(67, 48\)",
    ):
        run_threads(lambda g: VocabParallelTPGPT.from_shard_state_dict(shard, dense.config, group=g), 2)


# ---------------------------------------------------------------------------- memory


def test_parameters_per_rank_at_gpt2_small():
    config = GPTConfig(vocab_size=50304, n_embd=768, n_layer=12, n_head=12, block_size=1024)
    V, Cg, L = 50304, 768, 12
    per_layer = 2 * 2 * Cg + (3 * Cg * Cg + 3 * Cg) + (Cg * Cg + Cg) + (4 * Cg * Cg + 4 * Cg) + (4 * Cg * Cg + Cg)
    dense = V * Cg + 1024 * Cg + L * per_layer + 2 * Cg
    assert dense == 124_475_904  # nanoGPT's "124M"
    # at p = 4 the blocks' matrices and sharded biases are split, layer norms and row-parallel biases are not
    split_layer = (
        2 * 2 * Cg
        + (3 * Cg * Cg + 3 * Cg) // 4
        + (Cg * Cg) // 4
        + Cg
        + (4 * Cg * Cg + 4 * Cg) // 4
        + (4 * Cg * Cg) // 4
        + Cg
    )
    rest = 1024 * Cg + L * split_layer + 2 * Cg
    counts = param_counts_per_rank(config, 4)
    assert counts == {
        "dense": dense,
        "replicated_head": V * Cg + rest,
        "vocab_parallel": V * Cg // 4 + rest,
        "saved": V * Cg * 3 // 4,
    }
    assert counts["saved"] == 28_975_104  # 29M of a replicated-head rank's 60.7M parameters
    assert param_counts_per_rank(config, 1)["saved"] == 0


@pytest.mark.parametrize("p", [2, 3])
def test_parameter_counts_match_built_models(p):
    dense = make_gpt(vocab_size=67, n_layer=2)
    counts = param_counts_per_rank(dense.config, p)
    assert counts["dense"] == sum(q.numel() for q in dense.parameters())

    def fn(group):
        return [
            sum(q.numel() for q in cls.from_dense(dense, group=group).parameters())  # tied: counted once
            for cls in (TPGPT, VocabParallelTPGPT)
        ]

    for replicated, vocab in run_threads(fn, p):
        assert (replicated, vocab) == (counts["replicated_head"], counts["vocab_parallel"])


def test_class_plan_is_the_vocab_plan_for_the_default_multiple():
    from tputil.shard import GPT_VOCAB_TP_PLAN, vocab_parallel_plan
    from tputil.tp_model import VocabParallelTPGPT

    assert VocabParallelTPGPT.plan is GPT_VOCAB_TP_PLAN
    assert VocabParallelTPGPT.plan == vocab_parallel_plan(1)


# ---------------------------------------------------------------------------- one model, options choose the head


def test_vocab_parallel_tpgpt_is_tpgpt_with_other_defaults():
    """One forward, one generate, one way to load: the chapter-10 name only sets vocab_parallel=True."""
    for name in ("forward", "generate", "loss", "argmax", "gather_logits", "from_dense", "from_shard_state_dict"):
        assert name not in vars(VocabParallelTPGPT), name
    dense = make_gpt(vocab_size=67, n_layer=1)

    def fn(group):
        return (
            VocabParallelTPGPT.from_dense(dense, group=group, multiple=4),
            TPGPT.from_dense(dense, group=group, vocab_parallel=True, multiple=4),
        )

    for alias, model in run_threads(fn, 2):
        assert alias.plan == model.plan == vocab_parallel_plan(4)
        assert repr(alias) == repr(model).replace("TPGPT", "VocabParallelTPGPT", 1)
        assert all(torch.equal(a, b) for a, b in zip(alias.state_dict().values(), model.state_dict().values()))


def test_a_subclass_that_swaps_the_head_loads_by_its_own_plan():
    """Chapter 10 derives its model as a TPGPT subclass that names its plan and swaps wte and lm_head."""

    class Swapped(TPGPT):
        plan = vocab_parallel_plan()

        def __init__(self, config, *, group):
            super().__init__(config, group=group)
            V, C = config.vocab_size, config.n_embd
            self.transformer.wte = VocabParallelEmbedding(V, C, group=group)
            self.lm_head = ColumnParallelLinear(C, self.transformer.wte.padded_vocab_size, group=group, bias=False)
            self.lm_head.weight = self.transformer.wte.weight

    dense = make_gpt(vocab_size=67, n_layer=1)
    torch.manual_seed(0)
    swapped = run_threads(lambda g: Swapped.from_dense(dense, group=g), 2)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))  # built on the meta device: nothing drawn
    package = run_threads(lambda g: VocabParallelTPGPT.from_dense(dense, group=g), 2)
    for ours, theirs in zip(swapped, package):
        assert ours.lm_head.weight is ours.transformer.wte.weight
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
