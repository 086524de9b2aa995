"""How far two float computations of the same sum can drift apart: rounding bounds (chapter 7).

One rounding: fl(a + b) = (a + b)(1 + d), |d| <= u, the unit roundoff (eps / 2). A sum or dot
product of n terms in any order is within n u sum|terms| of the exact value (Higham's gamma_n, to
first order), so two orders are within twice that of each other. For a whole GPT the bound is a
first-order estimate along the longest chain of roundings, not a theorem: chapter 7 derives it and
checks it against float64.
"""

from __future__ import annotations

import math

import torch

__all__ = ["unit_roundoff", "sum_bound", "additions_on_path", "gpt_logit_bound", "logit_term_sizes", "greedy_margins"]


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding (2^-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def sum_bound(abs_sum, n: int, dtype: torch.dtype):
    """The first-order bound on |computed - exact| for a sum or dot product of n terms: n u sum|terms|.

    `abs_sum` may be a number or a tensor (one bound per entry). For a plain sum (no products)
    n - 1 would do; n also covers the rounding of the products of a dot product.
    """
    if n < 1:
        raise ValueError(f"n={n}: a sum has at least one term")
    return n * unit_roundoff(dtype) * abs_sum


def additions_on_path(config, T: int) -> int:
    """Rounding steps along the longest chain from the embeddings to one logit (counted in chapter 7).

    11C + hs + 2T + 20 per layer (norms, c_attn, attention, c_proj, c_fc, GELU, mlp.c_proj and the
    residual adds), and 1 + (2C + 4) + C around the layers (embedding add, ln_f, lm_head).
    """
    C, hs = config.n_embd, config.n_embd // config.n_head
    per_layer = 11 * C + hs + 2 * T + 20
    return config.n_layer * per_layer + 1 + (2 * C + 4) + C


def gpt_logit_bound(config, T: int, magnitude: float, dtype: torch.dtype) -> dict:
    """Two estimates of max |logits_a - logits_b| for two orders of the same GPT forward pass.

    magnitude: the size of a logit's terms, max over logits of sum_c |h_c| |W_vc| (h the output of
    ln_f, W = lm_head's weight): what a relative error of h turns into, in logit units.
    worst: 2 n u magnitude, each run off by at most n u of relative error (n = additions_on_path),
    typical: sqrt(n) u magnitude, the size of a random walk of n roundings of random sign.
    """
    n, u = additions_on_path(config, T), unit_roundoff(dtype)
    return {"n": n, "worst": 2 * n * u * magnitude, "typical": math.sqrt(n) * u * magnitude}


def logit_term_sizes(model, idx):
    """M at every position of idx, (B, T): max over the vocabulary of sum_c |h_c| |W_vc|.

    h is the output of ln_f for that position, W the head's weight: the size of the terms whose sum
    is a logit, which `gpt_logit_bound` turns a relative error into logit units with. `model` is a
    dense `model.GPT`.
    """
    t = model.transformer
    with torch.no_grad():
        x = t.wte(idx) + t.wpe(torch.arange(idx.size(1), device=idx.device))  # (B, T, C)
        for block in t.h:
            x = block(x)
        h = t.ln_f(x)  # (B, T, C): the head's input
        return (h.abs() @ model.lm_head.weight.abs().T).amax(dim=-1)  # (B, T)


def greedy_margins(model, tokens, n_prompt: int) -> tuple[list, list]:
    """(gaps, bounds), one of each per generated token of tokens[:, n_prompt:].

    gap: the smallest, over the batch, difference between the best and the second-best logit;
    bound: `gpt_logit_bound`'s worst case for that step's context and M. A gap above its bound
    cannot be flipped by another summation order's rounding.
    """
    config, dtype = model.config, next(model.parameters()).dtype
    gaps, bounds = [], []
    with torch.no_grad():
        for t in range(n_prompt, tokens.size(1)):
            context = tokens[:, :t][:, -config.block_size :]  # (B, T_t), as generate crops it
            top2 = model(context)[0][:, -1].topk(2, dim=-1).values  # (B, 2)
            gaps.append((top2[:, 0] - top2[:, 1]).min().item())
            size = logit_term_sizes(model, context)[:, -1].max().item()
            bounds.append(gpt_logit_bound(config, context.size(1), size, dtype)["worst"])
    return gaps, bounds
