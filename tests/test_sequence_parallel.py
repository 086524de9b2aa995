"""Sequence parallelism (chapter 11): the mappings along T, the layers, the whole GPT, its collectives.

Float64 throughout where equality is claimed (FLOAT64, 1e-12: the sums only change order), with one
float32 case at FLOAT32 (tp_helpers explains that tolerance).
"""

import pytest
import torch
from torch import nn

from tp_helpers import FLOAT32, FLOAT64, assert_no_close_calls, make_gpt
from tputil.comm import (
    SingleGroup,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    run_threads,
    scatter_to_sequence_parallel_region,
)
from tputil.course import activations
from tputil.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from tputil.shard import shard_state_dict
from tputil.tp_model import TPGPT
from tputil.train import train

B, C, V = 2, 48, 67
F64 = torch.float64


def per_rank(p, *shape, seed=0):
    """p different float64 tensors of one shape: what each rank holds."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(p)]


# ---------------------------------------------------------------------------- the mappings


@pytest.mark.parametrize("p", [2, 4])
def test_scatter_keeps_own_tokens_and_all_gathers_the_gradient(p):
    (x,), grads = per_rank(1, B, 8, C), per_rank(p, B, 8 // p, C, seed=1)

    def fn(group):
        xr = x.clone().requires_grad_()
        with group.stats.measure() as m:
            y = scatter_to_sequence_parallel_region(xr, group)
            y.backward(grads[group.rank])
        return y, xr.grad, m

    for r, (y, grad, m) in enumerate(run_threads(fn, p)):
        assert torch.equal(y, x.chunk(p, dim=1)[r])  # forward: no communication
        assert torch.equal(grad, torch.cat(grads, dim=1))  # backward: every rank's tokens' gradients
        assert m.calls == {"all_gather": 1} and m.bytes == {"all_gather": B * 8 // p * C * 8}
        assert [c.tag for c in m.log] == ["scatter_to_sequence_parallel_region.backward"]


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("tensor_parallel_output_grad", [True, False])
def test_gather_all_gathers_and_reduce_scatters_or_keeps_the_gradient(p, tensor_parallel_output_grad):
    xs, grads = per_rank(p, B, 2, C), per_rank(p, B, 2 * p, C, seed=1)

    def fn(group):
        xr = xs[group.rank].clone().requires_grad_()
        with group.stats.measure() as m:
            y = gather_from_sequence_parallel_region(xr, group, tensor_parallel_output_grad=tensor_parallel_output_grad)
            y.backward(grads[group.rank])
        return y, xr.grad, m

    for r, (y, grad, m) in enumerate(run_threads(fn, p)):
        assert torch.equal(y, torch.cat(xs, dim=1))
        if tensor_parallel_output_grad:  # each rank's gradient is a partial sum: summed, own tokens kept
            torch.testing.assert_close(grad, sum(grads).chunk(p, dim=1)[r], **FLOAT64)
            assert m.calls == {"all_gather": 1, "reduce_scatter": 1}
        else:  # the whole gradient on every rank already: own tokens kept, nothing sent
            assert torch.equal(grad, grads[r].chunk(p, dim=1)[r])
            assert m.calls == {"all_gather": 1}


@pytest.mark.parametrize("p", [2, 4])
def test_reduce_scatter_sums_keeps_own_tokens_and_all_gathers_the_gradient(p):
    xs, grads = per_rank(p, B, 2 * p, C), per_rank(p, B, 2, C, seed=1)

    def fn(group):
        xr = xs[group.rank].clone().requires_grad_()
        with group.stats.measure() as m:
            y = reduce_scatter_to_sequence_parallel_region(xr, group)
            y.backward(grads[group.rank])
        return y, xr.grad, m

    for r, (y, grad, m) in enumerate(run_threads(fn, p)):
        torch.testing.assert_close(y, sum(xs).chunk(p, dim=1)[r], **FLOAT64)
        assert torch.equal(grad, torch.cat(grads, dim=1))
        assert m.bytes == {"reduce_scatter": B * 2 * p * C * 8, "all_gather": B * 2 * C * 8}


def test_mappings_are_the_identity_at_p_1_and_refuse_t_not_divisible():
    x = torch.randn(B, 6, C)
    assert run_threads(lambda g: scatter_to_sequence_parallel_region(x, g), 1)[0] is x
    with pytest.raises(Exception, match="pad T to a multiple of 4"):
        run_threads(lambda g: scatter_to_sequence_parallel_region(x, g), 4)
    with pytest.raises(Exception, match="not divisible into p=4"):
        run_threads(lambda g: reduce_scatter_to_sequence_parallel_region(x, g), 4)


# ---------------------------------------------------------------------------- the layers


def keep(saved):
    """A pack hook for saved_tensors_hooks that records each tensor saved for backward."""

    def pack(t):
        saved.append(t)
        return t

    return pack


@pytest.mark.parametrize("p", [2, 4])
def test_column_parallel_saves_only_its_own_tokens_and_matches_nn_linear(p):
    torch.manual_seed(0)
    dense, x = nn.Linear(C, 96).to(F64), torch.randn(B, 8, C, dtype=F64, requires_grad=True)
    y = dense(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    def fn(group):
        layer = ColumnParallelLinear.from_dense(dense, group=group, sequence_parallel=True)
        xr = x.detach().chunk(p, dim=1)[group.rank].clone().requires_grad_()
        saved = []
        with group.stats.measure() as m, torch.autograd.graph.saved_tensors_hooks(keep(saved), lambda t: t):
            out = layer(xr)  # (B, T, 96/p)
        with group.stats.measure() as mb:
            out.backward(grad_y.chunk(p, dim=-1)[group.rank])
        return out, xr.grad, layer, saved, m, mb

    for r, (out, grad_x, layer, saved, m, mb) in enumerate(run_threads(fn, p)):
        torch.testing.assert_close(out, y.chunk(p, dim=-1)[r], **FLOAT64)
        torch.testing.assert_close(grad_x, x.grad.chunk(p, dim=1)[r], **FLOAT64)  # reduce-scattered: summed
        torch.testing.assert_close(layer.weight.grad, dense.weight.grad.chunk(p)[r], **FLOAT64)
        torch.testing.assert_close(layer.bias.grad, dense.bias.grad.chunk(p)[r], **FLOAT64)
        activations = [t for t in saved if not isinstance(t, nn.Parameter)]
        assert [tuple(t.shape) for t in activations] == [(B, 8 // p, C)]  # X_r only, not the gathered X
        assert m.calls == {"all_gather": 1} and m.bytes == {"all_gather": B * 8 // p * C * 8}
        # backward: X all-gathered again for dL/dW, and dL/dX reduce-scattered
        assert mb.calls == {"all_gather": 1, "reduce_scatter": 1}
        assert mb.bytes == {"all_gather": B * 8 // p * C * 8, "reduce_scatter": B * 8 * C * 8}


@pytest.mark.parametrize("p", [2, 4])
def test_row_parallel_reduce_scatters_and_adds_the_bias_to_own_tokens(p):
    torch.manual_seed(0)
    dense, x = nn.Linear(96, C).to(F64), torch.randn(B, 8, 96, dtype=F64)
    y = dense(x)

    def fn(group):
        layer = RowParallelLinear.from_dense(dense, group=group, sequence_parallel=True)
        with group.stats.measure() as m:
            out = layer(x.chunk(p, dim=-1)[group.rank])
        out.sum().backward()
        return out, layer.bias.grad, m

    results = run_threads(fn, p)
    for r, (out, bias_grad, m) in enumerate(results):
        torch.testing.assert_close(out, y.chunk(p, dim=1)[r], **FLOAT64)  # (B, T/p, C): own tokens
        assert m.calls == {"reduce_scatter": 1} and m.bytes == {"reduce_scatter": B * 8 * C * 8}
        assert torch.equal(bias_grad, torch.full((C,), B * 8.0 / p, dtype=F64))  # own tokens' share only
    assert torch.equal(sum(b for _, b, _ in results), torch.full((C,), B * 8.0, dtype=F64))


def test_vocab_parallel_embedding_reduce_scatters_straight_into_the_sequence_region():
    torch.manual_seed(0)
    dense, ids = nn.Embedding(V, C).to(F64), torch.randint(0, V, (B, 8))

    def fn(group):
        emb = VocabParallelEmbedding.from_dense(dense, group=group, sequence_parallel=True)
        with group.stats.measure() as m:
            out = emb(ids)
        return out, m

    for r, (out, m) in enumerate(run_threads(fn, 4)):
        assert torch.equal(out, dense(ids).chunk(4, dim=1)[r])  # one rank's row plus zeros: exact
        assert m.calls == {"reduce_scatter": 1} and m.bytes == {"reduce_scatter": B * 8 * C * 8}


# ---------------------------------------------------------------------------- the whole GPT


def dense_reference(T, *, dtype=F64, seed=0):
    dense = make_gpt(vocab_size=V, n_layer=2, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    logits, loss = dense(idx, targets)
    loss.backward()
    return dense, idx, targets, logits, loss, {n: q.grad for n, q in dense.named_parameters()}


def sp_step(dense, idx, targets, p, *, vocab_parallel, all_reduce_grads=True):
    """Forward and backward of TPGPT(sequence_parallel=True) on p threads: per rank (model, logits, loss, comm)."""

    def fn(group):
        model = TPGPT.from_dense(dense, group=group, vocab_parallel=vocab_parallel, sequence_parallel=True)
        with group.stats.measure() as fwd:
            out, loss = model(idx, targets)
        with group.stats.measure() as bwd:
            loss.backward()
        with group.stats.measure() as sync:
            if all_reduce_grads:
                model.all_reduce_sequence_parallel_grads()
        return model, model.gather_logits(out), loss, fwd, bwd, sync

    return run_threads(fn, p)


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("T", [8, 5])  # 5: padded to 6 (p = 2) or 8 (p = 4)
@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_logits_loss_and_every_gradient_equal_the_dense_models(p, T, vocab_parallel):
    dense, idx, targets, logits, loss, grads = dense_reference(T)
    for model, full, tp_loss, *_ in sp_step(dense, idx, targets, p, vocab_parallel=vocab_parallel):
        torch.testing.assert_close(full, logits, **FLOAT64)
        torch.testing.assert_close(tp_loss, loss, **FLOAT64)
        expected = shard_state_dict(grads, dense.config, model.group.rank, p, plan=model.plan)
        for name, q in model.named_parameters():
            torch.testing.assert_close(q.grad, expected[name], **FLOAT64, msg=lambda m: f"{name}: {m}")


def test_float32_within_the_float32_tolerance():
    dense, idx, targets, logits, loss, grads = dense_reference(7, dtype=torch.float32)
    for model, full, tp_loss, *_ in sp_step(dense, idx, targets, 4, vocab_parallel=True):
        torch.testing.assert_close(full, logits, **FLOAT32)
        torch.testing.assert_close(tp_loss, loss, **FLOAT32)
        expected = shard_state_dict(grads, dense.config, model.group.rank, 4, plan=model.plan)
        for name, q in model.named_parameters():
            torch.testing.assert_close(q.grad, expected[name], **FLOAT32, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_forgetting_the_grad_all_reduce_leaves_exactly_the_own_token_parameters_wrong(vocab_parallel):
    """Negative control: without all_reduce_sequence_parallel_grads the norms' and c_proj biases' (and,
    vocabulary-parallel, wpe's) gradients are partial sums; every other gradient is already right."""
    dense, idx, targets, _, _, grads = dense_reference(8)
    results = sp_step(dense, idx, targets, 2, vocab_parallel=vocab_parallel, all_reduce_grads=False)
    partial = set(results[0][0].sequence_parallel_parameters())
    expected_partial = {n for n in grads if ".ln_" in n or n.endswith("c_proj.bias")}
    assert partial == expected_partial | ({"transformer.wpe.weight"} if vocab_parallel else set())
    for model, *_ in results:
        expected = shard_state_dict(grads, dense.config, model.group.rank, 2, plan=model.plan)
        for name, q in model.named_parameters():
            close = torch.allclose(q.grad, expected[name], **FLOAT64)
            assert close == (name not in partial), name
    # the ranks' partial gradients differ, so one AdamW step would set their replicated weights apart
    assert not torch.equal(results[0][0].transformer.ln_f.weight.grad, results[1][0].transformer.ln_f.weight.grad)


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_collectives_per_layer_forward_backward_and_step(vocab_parallel):
    """Count and bytes at p = 4, T = 5 padded to T' = 8, float64: no all-reduce inside the blocks."""
    p, T, Tp, e = 4, 5, 8, 8
    dense, idx, targets, *_ = dense_reference(T)
    n, tokens, own = dense.config.n_layer, B * Tp * C * e, B * Tp // p * C * e  # message sizes, bytes
    for model, _, _, fwd, bwd, sync in sp_step(dense, idx, targets, p, vocab_parallel=vocab_parallel):
        head = 1 if vocab_parallel else 0  # the vocabulary-parallel head's lm_head and embedding
        # forward, per layer: 2 all-gathers (c_attn, c_fc inputs) and 2 reduce-scatters (both c_proj)
        assert fwd.calls["all_gather"] == 2 * n + 1  # + before the head (ln_f's output, or lm_head's input)
        assert fwd.calls["reduce_scatter"] == 2 * n + head  # + the embedding's rows, vocabulary-parallel
        assert fwd.bytes["all_gather"] == (2 * n + 1) * own
        assert fwd.bytes["reduce_scatter"] == (2 * n + head) * tokens
        assert fwd.calls["all_reduce"] == 3 * head  # only the vocabulary-parallel loss, of B*T numbers
        assert fwd.bytes["all_reduce"] == 3 * head * B * T * e
        # backward, per layer: X again for dL/dW and dL/dX reduce-scattered (c_attn, c_fc), the
        # all-gathered gradient of each c_proj's reduce-scatter: 4 all-gathers and 2 reduce-scatters
        assert bwd.calls == {"all_gather": 4 * n + 1 + head, "reduce_scatter": 2 * n + head}
        assert bwd.bytes == {"all_gather": (4 * n + 1 + head) * own, "reduce_scatter": (2 * n + head) * tokens}
        # the exception to chapter 9's rule: one all-reduce of the own-token parameters' gradients
        numel = sum(q.numel() for q in model.sequence_parallel_parameters().values())
        assert numel == (2 * n + 1) * 2 * C + 2 * n * C + (dense.config.block_size * C if vocab_parallel else 0)
        assert sync.calls == {"all_reduce": 1} and sync.bytes == {"all_reduce": numel * e}
        inside = [c for c in fwd.log + bwd.log if c.kind == "all_reduce"]
        assert all(c.tag.startswith("vocab_parallel_cross_entropy.") for c in inside), [c.tag for c in inside]


@pytest.mark.parametrize("p", [2, 4])
def test_greedy_generation_is_the_dense_models(p):
    dense = make_gpt(vocab_size=V, n_layer=2)
    idx = torch.randint(0, V, (2, 3))
    expected = dense.generate(idx, 12)  # contexts of 3 .. 14 tokens: most of them padded
    assert_no_close_calls(dense, expected, 3)
    for vocab_parallel in (False, True):
        fn = lambda g: TPGPT.from_dense(  # noqa: E731
            dense, group=g, vocab_parallel=vocab_parallel, sequence_parallel=True
        ).generate(idx, 12)  # without chapter 13's cache (one new token cannot be split along T)
        for out in run_threads(fn, p):
            assert torch.equal(out, expected)


def test_training_follows_the_dense_loss_and_ranks_stay_equal():
    dense = make_gpt(vocab_size=256, n_layer=2, block_size=16, dtype=F64)
    kwargs = dict(batch_size=2, block_size=15)  # 15: padded to 16 at p = 2
    expected = train(make_gpt(vocab_size=256, n_layer=2, block_size=16, dtype=F64), 3, **kwargs)

    def fn(group):
        model = TPGPT.from_dense(dense, group=group, vocab_parallel=True, sequence_parallel=True)
        calls = []
        losses = train(model, 3, on_step=lambda s, loss, comm: calls.append(comm.calls["all_reduce"]), **kwargs)
        return losses, calls, model.transformer.ln_f.weight.detach()

    (losses0, calls, ln0), (losses1, _, ln1) = run_threads(fn, 2)
    for tp, ref in zip(losses0, expected):
        assert abs(tp - ref) <= 1e-12
    assert losses0 == losses1 and torch.equal(ln0, ln1)
    assert calls == [3 + 1] * 3  # the loss's three and the one all-reduce of the own-token gradients


def test_bad_combinations_are_refused_with_what_to_change():
    dense = make_gpt(n_layer=1)
    with pytest.raises(ValueError, match="pass only one of them"):
        TPGPT.from_dense(dense, group=SingleGroup(), sequence_parallel=True, async_grad_all_reduce=True)
    layer = ColumnParallelLinear(C, C, group=SingleGroup(), sequence_parallel=True)
    layer.async_grad_all_reduce = True
    with pytest.raises(ValueError, match="set one of them to False"):
        layer(torch.randn(1, 2, C))


# ---------------------------------------------------------------------------- activation memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [8, 5])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_measured_activation_bytes_equal_the_formula(dtype, T, sequence_parallel):
    dense = make_gpt(vocab_size=V, n_layer=2, dtype=dtype)
    idx, targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    for p in (1, 2, 4):

        def fn(group):
            model = TPGPT.from_dense(dense, group=group, sequence_parallel=sequence_parallel).train()
            return activations.saved_bytes(model, lambda: model(idx, targets))

        per_layer = activations.layer_bytes(
            dense.config, B, T, p, sequence_parallel=sequence_parallel, element_size=dtype.itemsize
        )
        for measured in run_threads(fn, p):
            assert {r: measured[r] for r in activations.BLOCK_REGIONS} == {r: 2 * b for r, b in per_layer.items()}


def test_sequence_parallelism_divides_every_layer_term_by_p_but_the_mask():
    config, T = make_gpt(n_layer=1).config, 8
    dense = sum(activations.layer_bytes(config, B, T, 1, sequence_parallel=False, element_size=4).values())
    for p in (2, 4):
        sp = sum(activations.layer_bytes(config, B, T, p, sequence_parallel=True, element_size=4).values())
        tp = sum(activations.layer_bytes(config, B, T, p, sequence_parallel=False, element_size=4).values())
        assert p * sp == dense + (p - 1) * T * T  # the causal mask (T^2 bool) is on every rank whole
        assert tp - sp == 4 * (B * T * config.n_embd + B * T) * 4 * (p - 1) // p  # the norms' and two inputs'


def test_saved_bytes_counts_each_storage_once_and_no_parameter():
    linear = nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)

    def run():
        y = linear(x)  # saves x and the weight: only x counts
        return y * y + y.exp()  # y saved by mul (twice: one storage) and exp's output: another storage

    measured = activations.saved_bytes(linear, run)
    assert measured == {"loss": 5 * 4 * 4 + 5 * 3 * 4 + 5 * 3 * 4}  # x, y, exp(y); outside any submodule
    assert activations.korthikanti_bytes(1, 1, 1, 1) == 34 + 5
    assert activations.korthikanti_bytes(2048, 1, 12288, 96, 8, sequence_parallel=True) == pytest.approx(
        2048 * 12288 * (34 + 5 * 96 * 2048 / 12288) / 8
    )
