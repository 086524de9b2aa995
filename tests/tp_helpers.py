"""Shared pieces of the package tests: small configs, a randomized dense model, tolerances.

Plain values and functions, imported by the tests; importing this module changes nothing (the
thread count and the shared fixtures are in conftest.py).

Tolerance. A tensor-parallel layer computes the same sums as the dense one in a different order
(p partial sums, then an all-reduce), and floating-point addition is not associative, so float32
results differ from the dense ones in the last bits: about 1e-7 relative per addition, growing
slowly with depth. FLOAT32 allows 1e-5, far above that noise and far below any real bug (a
missing head, a bias added p times, a wrong stride move outputs by 1e-2 or more). Where an
exact-ish check is wanted we use float64 (noise about 1e-16) with FLOAT64.
"""

import torch
from hypothesis import settings

from tputil.model import GPTConfig, untrained_gpt
from tputil.shard import GPT_TP_PLAN, shard_state_dict

FLOAT32 = dict(rtol=1e-5, atol=1e-5)
FLOAT64 = dict(rtol=1e-12, atol=1e-12)

# Small, fast, and with n_head = 12 every p in {1, 2, 3, 4} divides the heads.
SMALL = dict(block_size=32, vocab_size=64, n_layer=4, n_head=12, n_embd=48)
DEGREES = (1, 2, 3, 4)

# Property tests: few small examples each, no deadline (threads start slowly on a busy CI machine).
PROPERTY = settings(max_examples=20, deadline=None, database=None)


def make_gpt(seed=0, dtype=torch.float32, **overrides):
    """`model.untrained_gpt` of SMALL (with overrides), the blocks' weights at GPT-2's init, in dtype.

    Every bias and norm weight is random, so a test can see a bias added twice or a norm weight
    sliced wrongly. It seeds the global generator: what a test draws after it is fixed.
    """
    return untrained_gpt(GPTConfig(**{**SMALL, **overrides}), seed, block_std=None).to(dtype)


def assert_grads_are_shards(model, dense_grads, config, rank, p, *, plan=GPT_TP_PLAN):
    """Every parameter's .grad on rank `rank` of p equals its shard of the dense gradients (FLOAT32)."""
    expected = shard_state_dict(dense_grads, config, rank, p, plan=plan)
    for name, q in model.named_parameters():
        torch.testing.assert_close(q.grad, expected[name], **FLOAT32, msg=lambda m: f"{name}: {m}")


def assert_no_close_calls(model, tokens, n_prompt):
    """The premise of comparing greedy tokens across summation orders (ranks, kernels, thread counts).

    Every step's gap between the best and the second-best logit must exceed chapter 7's worst-case
    bound on float32 rounding of a logit; then no order of summation can flip a choice.
    """
    from tputil.course import precision

    gaps, bounds = precision.greedy_margins(model, tokens, n_prompt)
    close = [g / b for g, b in zip(gaps, bounds) if not g > b]
    assert not close, f"a close call: gap/bound {min(close):.2f}"
