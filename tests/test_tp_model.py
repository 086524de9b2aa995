"""The tensor-parallel MLP, attention, block and GPT against the dense ones, and what they communicate."""

import pytest
import torch
from hypothesis import given, strategies as st

from tp_helpers import DEGREES, FLOAT32, FLOAT64, PROPERTY, assert_no_close_calls, make_gpt
from tputil.comm import RankError, SingleGroup, run_threads
from tputil.shard import GPT_TP_PLAN, Shard, shard_shapes, shard_state_dict
from tputil.tp_model import TPGPT, TPMLP, TPBlock, TPCausalSelfAttention

B, T = 2, 16


def tp_module(cls, dense_module, config, group):
    """A TP module loaded with this rank's shard of a dense module (names line up, so one plan serves)."""
    prefix = {
        TPMLP: "transformer.h.0.mlp.",
        TPCausalSelfAttention: "transformer.h.0.attn.",
        TPBlock: "transformer.h.0.",
    }[cls]
    sd = {prefix + k: v for k, v in dense_module.state_dict().items()}
    shard = shard_state_dict(sd, config, group.rank, group.world_size)
    module = cls(config, group=group).to(next(dense_module.parameters()).dtype)
    module.load_state_dict({k[len(prefix) :]: v for k, v in shard.items()})
    return module


@pytest.mark.parametrize("p", DEGREES)
@pytest.mark.parametrize(
    "cls, name, n_all_reduce", [(TPMLP, "mlp", 1), (TPCausalSelfAttention, "attn", 1), (TPBlock, None, 2)]
)
def test_tp_pieces_match_dense_and_count_their_all_reduces(p, cls, name, n_all_reduce):
    dense_gpt = make_gpt()
    block = dense_gpt.transformer.h[0]
    dense = block if name is None else getattr(block, name)
    x = torch.randn(B, T, 48)
    y = dense(x)

    def fn(group):
        module = tp_module(cls, dense, dense_gpt.config, group)
        with group.stats.measure() as m:
            out = module(x)
        return out, m

    for out, m in run_threads(fn, p):
        torch.testing.assert_close(out, y, **FLOAT32)
        if p == 1:
            assert m.total_calls == 0  # the one-device shortcut communicates nothing
        else:  # each all-reduce carries B*T*C float32 numbers
            assert m.calls == {"all_reduce": n_all_reduce}
            assert m.bytes == {"all_reduce": n_all_reduce * B * T * 48 * 4}


def test_splitting_c_attn_without_the_stride_is_wrong():
    """Negative control (chapter 5): contiguous chunks of the fused q/k/v weight mix q, k and v."""
    dense_gpt = make_gpt()
    attn, x = dense_gpt.transformer.h[0].attn, torch.randn(B, T, 48)

    def fn(group):
        module = tp_module(TPCausalSelfAttention, attn, dense_gpt.config, group)
        with torch.no_grad():
            module.c_attn.weight.copy_(attn.c_attn.weight.chunk(group.world_size, dim=0)[group.rank])
            module.c_attn.bias.copy_(attn.c_attn.bias.chunk(group.world_size, dim=0)[group.rank])
        return module(x)

    assert (run_threads(fn, 2)[0] - attn(x)).abs().max() > 1e-2


@pytest.mark.parametrize("p", DEGREES)
def test_tp_gpt_logits_loss_and_gradients_match_dense(p):
    dense = make_gpt()
    idx, targets = torch.randint(0, 64, (B, T)), torch.randint(0, 64, (B, T))
    logits, loss = dense(idx, targets)
    loss.backward()
    dense_grads = {n: q.grad for n, q in dense.named_parameters()}

    def fn(group):
        model = TPGPT.from_dense(dense, group=group)
        with group.stats.measure() as fwd:
            out, tp_loss = model(idx, targets)
        with group.stats.measure() as bwd:
            tp_loss.backward()
        expected = shard_state_dict(dense_grads, dense.config, group.rank, p)
        for n, q in model.named_parameters():
            torch.testing.assert_close(q.grad, expected[n], **FLOAT32, msg=lambda m: f"{n}: {m}")
        return out, tp_loss, fwd, bwd

    for out, tp_loss, fwd, bwd in run_threads(fn, p):
        torch.testing.assert_close(out, logits, **FLOAT32)
        torch.testing.assert_close(tp_loss, loss, **FLOAT32)
        n = dense.config.n_layer
        if p > 1:
            # forward: two all-reduces per layer (attn.c_proj, mlp.c_proj) and nothing else
            assert fwd.calls == {"all_reduce": 2 * n} and fwd.bytes == {"all_reduce": 2 * n * B * T * 48 * 4}
            assert [rec.tag for rec in fwd.log] == ["reduce_from_parallel_region.forward"] * 2 * n
            # backward: the two f's (in front of c_attn and c_fc) of every layer
            assert bwd.calls == {"all_reduce": 2 * n}


@pytest.mark.parametrize("p", [1, 2, 4])
def test_tp_gpt_generates_the_same_tokens(p):
    dense = make_gpt(n_layer=4)
    idx = torch.randint(0, 64, (2, 4))
    expected = dense.generate(idx, 52)  # 56 tokens > block_size 32: cropping is exercised too
    assert_no_close_calls(dense, expected, 4)
    results = run_threads(lambda g: TPGPT.from_dense(dense, group=g).generate(idx, 52), p)
    for out in results:
        assert out.shape == (2, 56)
        assert torch.equal(out, expected)


def test_tp_gpt_is_exact_in_float64():
    dense = make_gpt(dtype=torch.float64)
    idx = torch.randint(0, 64, (B, T))
    logits, _ = dense(idx)
    for out, _ in run_threads(lambda g: TPGPT.from_dense(dense, group=g)(idx), 3):
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, logits, **FLOAT64)


@PROPERTY
@given(
    p=st.sampled_from(DEGREES),
    heads_per_rank=st.integers(1, 2),
    hs=st.integers(1, 4),
    n_layer=st.integers(1, 2),
    t=st.integers(1, 8),
    bias=st.booleans(),
)
def test_tp_gpt_matches_dense_over_shapes_and_degrees(p, heads_per_rank, hs, n_layer, t, bias):
    n_head = p * heads_per_rank
    dense = make_gpt(dtype=torch.float64, n_layer=n_layer, n_head=n_head, n_embd=n_head * hs, block_size=8, bias=bias)
    idx = torch.randint(0, 64, (2, t))
    logits, _ = dense(idx)
    for out, _ in run_threads(lambda g: TPGPT.from_dense(dense, group=g)(idx), p):
        torch.testing.assert_close(out, logits, **FLOAT64)


def test_names_tying_and_shapes_line_up_with_the_plan():
    dense = make_gpt(n_layer=2)
    for model in run_threads(lambda g: TPGPT.from_dense(dense, group=g), 2):
        assert list(model.state_dict()) == list(dense.state_dict())
        assert model.lm_head.weight is model.transformer.wte.weight
        assert {k: v.shape for k, v in model.state_dict().items()} == shard_shapes(dense.config, 2)
        assert model.transformer.h[1].attn.n_head == 6
        assert model.transformer.h[1].attn.c_attn.stride == 3  # a directly built model slices q, k, v per head


def test_building_from_dense_leaves_the_global_rng_alone():
    dense = make_gpt()
    torch.manual_seed(0)
    run_threads(lambda g: TPGPT.from_dense(dense, group=g), 3)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_p_1_is_the_dense_model():
    dense = make_gpt()
    model = TPGPT.from_dense(dense, group=SingleGroup())
    for (n, a), b in zip(dense.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    idx = torch.randint(0, 64, (B, T))
    with torch.no_grad():
        out, ref = model(idx)[0], dense(idx)[0]
    # The same products, but each row-parallel bias is added after its matmul rather than inside
    # it (addmm), which some kernels round differently (MKL_CBWR=COMPATIBLE): rounding only.
    torch.testing.assert_close(out, ref, **FLOAT32)


def test_a_degree_that_does_not_divide_the_heads_is_rejected():
    dense = make_gpt(n_head=6)
    with pytest.raises(
        RankError, match=r"n_head=6 is not divisible by p=4; p must divide n_head: try one of \[1, 2, 3, 6\]"
    ):
        run_threads(lambda g: TPGPT.from_dense(dense, group=g), 4)


def test_loading_a_shard_of_the_wrong_shape_names_the_parameter():
    dense = make_gpt()
    shard = shard_state_dict(dense.state_dict(), dense.config, 0, 3)
    with pytest.raises(
        RankError,
        match=r"rank 0: transformer.h.0.attn.c_attn.weight: expected shape \(72, 48\) "
        r"for a shard at p=2, got \(48, 48\)",
    ):
        run_threads(lambda g: TPGPT.from_shard_state_dict(shard, dense.config, group=g), 2)


def test_dropout_in_training_mode_draws_masks_and_eval_mode_none():
    """Chapter 12 (tests/test_dropout.py) checks the masks against the dense model; here: it runs."""
    dense = make_gpt(dropout=0.1)
    model = TPGPT.from_dense(dense, group=SingleGroup()).train()
    idx = torch.zeros(1, 4, dtype=torch.long)
    assert not torch.equal(model(idx)[0], model(idx)[0])  # a new mask each call
    assert torch.equal(model.eval()(idx)[0], model(idx)[0])


def test_the_c_attn_stride_is_read_from_the_plan(monkeypatch):
    """The plan states how c_attn is split, once: the TP attention takes its stride from there."""
    config = make_gpt(n_layer=1).config
    assert TPCausalSelfAttention(config, group=SingleGroup()).c_attn.stride == 3
    monkeypatch.setitem(GPT_TP_PLAN, "transformer.h.*.attn.c_attn.weight", Shard(0))
    with torch.device("meta"):
        assert TPCausalSelfAttention(config, group=SingleGroup()).c_attn.stride == 1


def test_a_model_loaded_by_the_plan_owns_its_tensors_on_the_dense_device_and_dtype():
    dense = make_gpt(n_layer=1, dtype=torch.float64)
    sd = dense.state_dict()
    model = TPGPT.from_dense(dense, group=SingleGroup())
    for name, t in model.state_dict().items():
        assert t.device == sd[name].device and t.dtype == torch.float64
        assert t.data_ptr() != sd[name].data_ptr()  # a copy: training it leaves the dense model alone
    assert all(q.requires_grad for q in model.parameters())


def test_multiple_needs_the_vocabulary_parallel_head():
    with pytest.raises(ValueError, match=r"multiple=128 pads the vocabulary of the vocabulary-parallel head"):
        TPGPT.from_dense(make_gpt(n_layer=1), group=SingleGroup(), multiple=128)


def test_the_async_grad_option_travels_through_every_way_of_building():
    dense = make_gpt(n_layer=1)
    shard = shard_state_dict(dense.state_dict(), dense.config, 0, 1)
    for model in (
        TPGPT.from_dense(dense, group=SingleGroup(), async_grad_all_reduce=True),
        TPGPT.from_shard_state_dict(shard, dense.config, group=SingleGroup(), async_grad_all_reduce=True),
        TPGPT(dense.config, group=SingleGroup(), vocab_parallel=True, async_grad_all_reduce=True),
    ):
        assert model.async_grad_all_reduce
        assert (
            model.transformer.h[0].attn.c_attn.async_grad_all_reduce
            and model.transformer.h[0].mlp.c_fc.async_grad_all_reduce
        )
    assert model.lm_head.async_grad_all_reduce  # the vocabulary-parallel head is column-parallel too
    assert not TPGPT.from_dense(dense, group=SingleGroup()).transformer.h[0].mlp.c_fc.async_grad_all_reduce
