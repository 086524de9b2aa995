"""tputil.course.precision: the rounding bounds hold, for sums in any order and for the tensor-parallel GPT."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from tp_helpers import PROPERTY, make_gpt
from tputil.comm import run_threads
from tputil.course import precision
from tputil.model import GPTConfig
from tputil.tp_model import TPGPT


def test_unit_roundoff_is_half_of_epsilon():
    assert precision.unit_roundoff(torch.float32) == 2.0**-24
    assert precision.unit_roundoff(torch.float64) == 2.0**-53
    assert precision.unit_roundoff(torch.bfloat16) == 2.0**-8
    one = torch.tensor(1.0)  # 1 + u is a tie and rounds to even, back to 1; 1 + eps does not
    assert one + 2.0**-24 == one and one + 2.0**-23 > one


@PROPERTY
@given(n=st.integers(2, 600), seed=st.integers(0, 2**16), chunks=st.integers(1, 8))
def test_a_sum_in_any_order_stays_within_the_bound(n, seed, chunks):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g) - 0.3) * 10.0 ** torch.randint(-3, 4, (n,), generator=g)
    exact = math.fsum(x.double().tolist())  # the float32 terms, summed exactly
    values = [np.float32(v) for v in x.tolist()]
    sequential = np.float32(0)
    for v in values:  # one order: left to right, in float32
        sequential = sequential + v
    parts = [np.float32(0)] * chunks  # another: chunk sums, then the chunks in order (TP's)
    for i, v in enumerate(values):
        parts[i * chunks // n] = parts[i * chunks // n] + v
    chunked = np.float32(0)
    for s in parts:
        chunked = chunked + s
    bound = precision.sum_bound(float(x.abs().double().sum()), n, torch.float32)
    assert abs(float(sequential) - exact) <= bound and abs(float(chunked) - exact) <= bound
    assert abs(float(sequential) - float(chunked)) <= 2 * bound


def test_sum_bound_per_entry_and_its_argument_check():
    b = precision.sum_bound(torch.tensor([1.0, 2.0]), 4, torch.float32)
    assert torch.equal(b, torch.tensor([4.0, 8.0]) * 2.0**-24)
    with pytest.raises(ValueError, match="at least one term"):
        precision.sum_bound(1.0, 0, torch.float32)


def test_additions_on_path_by_hand():
    config = GPTConfig(n_layer=4, n_head=4, n_embd=64)
    # per layer 11*64 + 16 + 2*32 + 20 = 804; around them 1 + 132 + 64
    assert precision.additions_on_path(config, 32) == 4 * 804 + 197


@pytest.mark.parametrize("p", [2, 3, 4])
def test_the_gpt_bound_covers_tp_against_dense_and_float32_against_float64(p):
    dense = make_gpt()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        logits = dense(idx)[0]
        exact = copy.deepcopy(dense).double()(idx)[0]
        x = dense.transformer.wte(idx) + dense.transformer.wpe(torch.arange(16))
        for block in dense.transformer.h:
            x = block(x)
        h = dense.transformer.ln_f(x)
        magnitude = (h.abs() @ dense.lm_head.weight.abs().T).max().item()
        tp = run_threads(lambda g: TPGPT.from_dense(dense, group=g)(idx)[0], p)
    bound = precision.gpt_logit_bound(dense.config, 16, magnitude, torch.float32)
    assert bound["typical"] < bound["worst"]
    for out in tp:
        assert (out - logits).abs().max().item() < bound["worst"]
    assert (logits.double() - exact).abs().max().item() < bound["worst"] / 2  # one run against exact


def test_logit_term_sizes_by_hand_and_greedy_margins_on_a_real_generation():
    model = make_gpt(seed=3, block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16)
    idx = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(5))
        for block in model.transformer.h:
            x = block(x)
        h = model.transformer.ln_f(x)
        by_hand = torch.stack(
            [(h[b, t].abs() * model.lm_head.weight.abs()).sum(-1).max() for b in range(2) for t in range(5)]
        ).view(2, 5)
        out = model.generate(idx, 20)  # past block_size: the cropping too
    torch.testing.assert_close(precision.logit_term_sizes(model, idx), by_hand)
    gaps, bounds = precision.greedy_margins(model, out, 5)
    assert len(gaps) == len(bounds) == 20 and all(g >= 0 for g in gaps) and all(b > 0 for b in bounds)
    with torch.no_grad():  # step 0 by hand: the last position of the prompt
        top2 = model(idx)[0][:, -1].topk(2).values
    assert gaps[0] == (top2[:, 0] - top2[:, 1]).min().item()
    size = precision.logit_term_sizes(model, idx)[:, -1].max().item()
    assert bounds[0] == precision.gpt_logit_bound(model.config, 5, size, torch.float32)["worst"]
    assert (
        bounds[-1]
        == precision.gpt_logit_bound(
            model.config, 16, precision.logit_term_sizes(model, out[:, 8:24])[:, -1].max().item(), torch.float32
        )["worst"]
    )
