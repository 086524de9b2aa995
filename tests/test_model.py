"""The dense GPT: names, tying, init, causality, attention math, loss and greedy generation."""

import math

import pytest
import torch
import torch.nn.functional as F

from tp_helpers import FLOAT64, make_gpt
from tputil.model import GPT, GPTConfig, causal_attention, untrained_gpt


def test_config_defaults_are_valid_and_small():
    config = GPTConfig()
    assert (config.block_size, config.vocab_size, config.n_layer, config.n_head, config.n_embd) == (64, 256, 4, 4, 64)
    assert config.head_size == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=50, n_head=4), r"n_embd=50 is not divisible by n_head=4.*e\.g\. \[48, 52\]"),
        (dict(n_layer=0), r"GPTConfig.n_layer=0: it must be a positive integer"),
        (dict(vocab_size=2.5), r"GPTConfig.vocab_size=2.5"),
        (dict(dropout=1.0), r"GPTConfig.dropout=1.0: it must be in \[0, 1\)"),
    ],
)
def test_config_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_parameter_names_match_nanogpt():
    model = GPT(GPTConfig(n_layer=1))
    expected = [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.attn.c_proj.bias",
        "transformer.h.0.ln_2.weight",
        "transformer.h.0.ln_2.bias",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_fc.bias",
        "transformer.h.0.mlp.c_proj.weight",
        "transformer.h.0.mlp.c_proj.bias",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
    ]
    assert list(model.state_dict()) == expected
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 64, 64)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (4 * 64, 64)


def test_no_bias_option_removes_every_bias():
    model = GPT(GPTConfig(n_layer=1, bias=False))
    assert not [n for n in model.state_dict() if n.endswith("bias")]


def test_lm_head_is_tied_to_wte():
    model = GPT(GPTConfig())
    assert model.lm_head.weight is model.transformer.wte.weight
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == n  # the tied matrix is counted once


def test_init_follows_gpt2():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=4, n_embd=128, n_head=4)
    model = GPT(config)
    block = model.transformer.h[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0
    assert torch.equal(block.ln_1.weight, torch.ones(128))


def test_untrained_gpt_perturbs_biases_norms_and_blocks_from_its_seed():
    config = GPTConfig(n_layer=2, n_embd=128, n_head=4)
    model = untrained_gpt(config, seed=1)
    after = torch.rand(3)
    torch.manual_seed(1)
    dense = GPT(config)  # the same draws first: GPT-2's init
    assert torch.equal(model.transformer.wpe.weight, dense.transformer.wpe.weight)  # not perturbed
    block = model.transformer.h[0]
    assert block.attn.c_attn.bias.std().item() == pytest.approx(0.05, rel=0.2)
    assert block.ln_1.weight.mean().item() == pytest.approx(1.0, abs=0.05)
    assert block.ln_1.weight.std().item() == pytest.approx(0.1, rel=0.2)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.2, rel=0.05)
    assert not model.training
    assert torch.equal(untrained_gpt(config, seed=1).state_dict()["lm_head.weight"], model.lm_head.weight)
    assert torch.equal(torch.rand(3), after)  # the global generator: seeded, then the same draws
    plain = untrained_gpt(config, seed=1, block_std=None).transformer.h[0]
    assert torch.equal(plain.mlp.c_fc.weight, dense.transformer.h[0].mlp.c_fc.weight)  # GPT-2's init kept


def test_forward_shapes_and_initial_loss():
    model = make_gpt()
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (3, 20))
    targets = torch.randint(0, 64, (3, 20))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 20, 64)
    # small random weights give nearly uniform predictions: loss close to ln(V)
    assert abs(loss.item() - math.log(64)) < 0.3
    assert model(idx)[1] is None


def test_loss_ignores_targets_of_minus_one():
    model = make_gpt()
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    logits, _ = model(idx)
    targets[:, :4] = -1
    _, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, 64), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_attention_is_causal():
    model = make_gpt(dtype=torch.float64)
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64  # change only the future of position 9
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], **FLOAT64)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_attention_math_matches_pytorch_sdpa_in_float64():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 7, 4, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v), expected, **FLOAT64)


def test_float64_model_runs_in_float64():
    model = make_gpt(dtype=torch.float64)
    logits, loss = model(torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8)))
    assert logits.dtype == torch.float64 and loss.dtype == torch.float64


def test_too_long_sequence_is_rejected():
    model = make_gpt()
    with pytest.raises(ValueError, match="length 33: block_size is only 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_greedy_generation_is_argmax_feedback_and_crops_to_block_size():
    model = make_gpt()
    idx = torch.randint(0, 64, (2, 5))
    out = model.generate(idx, 40)  # 45 > block_size 32: the context is cropped
    assert out.shape == (2, 45)
    assert torch.equal(out[:, :5], idx)
    expected = idx
    for _ in range(40):
        logits, _ = model(expected[:, -32:])
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = make_gpt()
    idx = torch.randint(0, 64, (2, 4))

    def draw(seed):
        return model.generate(idx, 10, greedy=False, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    top1 = model.generate(idx, 10, greedy=False, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, model.generate(idx, 10))
    with pytest.raises(ValueError, match="temperature=0"):
        model.generate(idx, 1, greedy=False, temperature=0)
