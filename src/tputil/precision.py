"""How far two float computations of the same sum can drift apart: rounding bounds for chapter 7.

Derived in chapter 7. Every floating-point addition or multiplication rounds its exact result to
the nearest representable number: fl(a + b) = (a + b)(1 + d) with |d| <= u, the *unit roundoff*,
half of the machine epsilon (u = 2^-24 in float32, 2^-53 in float64, 2^-8 in bfloat16). A dot
product or a sum of n terms, added in any order, is off from the exact value by at most about
n u times the sum of the terms' absolute values (Higham's gamma_n, to first order in u). Two
different orders of the same sum, such as the dense matmul and the tensor-parallel partial sums
plus all-reduce, are each within that of the exact value, so within twice that of each other.

For a whole GPT, `additions_on_path` counts the rounding steps that feed one logit along the
longest chain through the model (each sum or dot product of n terms counted as n), and
`gpt_logit_bound` turns it into a first-order estimate of the worst case: every step adds at most
u of relative error, none amplifies the errors before it. That premise is not a theorem (the
centering inside a layer norm and cancellation in sums can amplify by small factors), so chapter 7
checks the estimate against the float64 model, which is exact by comparison.
"""

from __future__ import annotations

import math

import torch

__all__ = ["unit_roundoff", "sum_bound", "additions_on_path", "gpt_logit_bound", "logit_term_sizes",
           "greedy_margins"]


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
    """Rounding steps along the longest chain from the embeddings to one logit (a count, not a proof).

    Per layer: ln_1 and ln_2 (a mean and a variance over C, and 4 elementwise steps: 2C + 4 each),
    c_attn (C + 1 with the bias), attention (q.k over hs, a scale, softmax's exp, sum over T and
    division, att @ v over T: hs + 2T + 3), attn.c_proj (C, its bias, the residual add: C + 2),
    c_fc (C + 1), GELU (3), mlp.c_proj (4C + 2). That is 11C + hs + 2T + 20 per layer. Around the
    layers: the embedding add (1), ln_f (2C + 4), lm_head (C).
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
    """How close each greedy choice that produced tokens[:, n_prompt:] was, and how close is too close.

    For every step: the smallest gap, over the batch, between the best and the second-best logit,
    and `gpt_logit_bound`'s worst case for that step's context and M. A gap above its bound cannot
    be closed by the rounding of another summation order (a tensor-parallel run, another kernel,
    another thread count), so the same tokens come out on any machine.
    """
    config, dtype = model.config, next(model.parameters()).dtype
    gaps, bounds = [], []
    with torch.no_grad():
        for t in range(n_prompt, tokens.size(1)):
            context = tokens[:, :t][:, -config.block_size:]  # (B, T_t), as generate crops it
            top2 = model(context)[0][:, -1].topk(2, dim=-1).values  # (B, 2)
            gaps.append((top2[:, 0] - top2[:, 1]).min().item())
            size = logit_term_sizes(model, context)[:, -1].max().item()
            bounds.append(gpt_logit_bound(config, context.size(1), size, dtype)["worst"])
    return gaps, bounds
