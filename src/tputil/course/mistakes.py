"""Negative controls: the mistakes the book warns about, built so a check can be seen to fail.

Each function builds one wrong variant of a tensor-parallel computation with the package's own
pieces, runs it next to the dense reference, and returns how far apart they are. Chapters 3 to 5
derive each mistake where it arises; chapter 7 gathers them in one table.
"""

import torch
from torch import nn
from torch.nn import functional as F

from ..comm import run_threads
from ..layers import RowParallelLinear
from ..model import MLP, CausalSelfAttention, GPTConfig
from ..shard import shard_tensor
from ..tp_model import TPMLP, TPCausalSelfAttention


def _max_error(outs, y) -> float:
    """The largest absolute difference between any rank's output and the dense output y."""
    return max((out - y).abs().max().item() for out in outs)


def _seeded(seed, make, n_features, rows):
    """(make(), x of shape (*rows, n_features)), drawn in that order after torch.manual_seed(seed).

    The global random state is left as it was (torch.random.fork_rng).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
        return module, torch.randn(*rows, n_features)


# --- chapter 3: parallel linear layers ---


def _linear_and_input(seed, in_features=48, out_features=16, rows=6):
    """A dense nn.Linear(48, 16) with its random bias and an input x (rows, 48), drawn from `seed`.

    The global RNG is left as it was. 48 input features: p in {1, 2, 3, 4, 6, 8, ...} divides them.
    """
    return _seeded(seed, lambda: nn.Linear(in_features, out_features), in_features, (rows,))


def row_parallel_bias_on_every_rank(p: int = 2, seed: int = 0) -> float:
    """Chapter 3's mistake: the row-parallel layer adds its bias on every rank, before the all-reduce.

    Rank r computes X_r A_r + b (X_r: (M, K/p), A_r: rows r of A, weight (N, K/p)), so the
    all-reduce returns XA + p b. Everything else is `layers.RowParallelLinear`. Returns the largest
    absolute difference from the dense nn.Linear(48, 16) over all ranks: (p - 1) max|b|, up to
    float32 rounding (0 at p = 1). p must divide 48.
    """
    linear, x = _linear_and_input(seed)

    def rank(group):
        layer = RowParallelLinear.from_dense(linear, group=group)
        x_r = shard_tensor(x, group.rank, p, dim=-1)  # (M, K/p) this rank's input features
        partial = F.linear(x_r, layer.weight, layer.bias)  # the mistake: + b on every rank
        return group.all_reduce(partial)  # (M, N) = XA + p b

    with torch.no_grad():
        y = linear(x)
        outs = run_threads(rank, p)
    return _max_error(outs, y)


# --- chapter 4: the MLP ---


def _dense_and_input(make, config, seed, batch=2, time=8):
    """make(config) and an input x (batch, time, n_embd), both drawn from `seed`; global RNG untouched."""
    return _seeded(seed, lambda: make(config), config.n_embd, (batch, time))


def _mlp_case(seed):
    """Chapter 4's dense MLP (n_embd 48, so p must divide 48) and its input."""
    return _dense_and_input(MLP, GPTConfig(n_embd=48, n_head=1), seed)


def _attention_case(seed):
    """Chapter 5's dense attention (n_embd 48, n_head 6, so p must divide 6) and its input."""
    return _dense_and_input(CausalSelfAttention, GPTConfig(n_embd=48, n_head=6), seed)


def mlp_split_before_gelu(p: int = 2, seed: int = 0) -> float:
    """Chapter 4's mistake: c_fc split by rows (its input features), so GELU sees partial sums.

    Rank r holds x[B, T, C_p] and W_fc[C_p, 4C] (W_fc = c_fc.weight.T; c_fc's bias added on rank 0
    only) and applies GELU to its partial pre-activation before any sum; then c_proj on every
    rank, one all-reduce, c_proj's bias once. Returns the largest absolute difference from the
    dense `model.MLP` (n_embd 48, so p must divide 48). At p = 1 nothing is split: rounding only,
    as c_proj's bias is added after its matmul rather than inside it.
    """
    mlp, x = _mlp_case(seed)

    def rank(group):
        r = group.rank
        x_r = x.chunk(p, dim=-1)[r]  # (B, T, C/p) this rank's input channels
        w_fc = shard_tensor(mlp.c_fc.weight, r, p, dim=1)  # (4C, C/p): W_fc[C_p, 4C]
        h_r = F.linear(x_r, w_fc, mlp.c_fc.bias if r == 0 else None)  # (B, T, 4C) a partial sum
        a_r = F.gelu(h_r)  # the mistake: GELU of a partial sum
        y_r = F.linear(a_r, mlp.c_proj.weight)  # (B, T, C)
        return group.all_reduce(y_r) + mlp.c_proj.bias  # (B, T, C) replicated

    with torch.no_grad():
        y = mlp(x)
        outs = run_threads(rank, p)
    return _max_error(outs, y)


# --- chapter 5: attention ---


def attention_contiguous_qkv_split(p: int = 2, seed: int = 0) -> float:
    """Chapter 5's mistake: c_attn's fused q/k/v weight (3C, C) cut into p contiguous chunks.

    Rank r takes rows [r 3C/p, (r+1) 3C/p) of c_attn's weight and bias instead of its heads of each
    of q, k and v (the strided split of `shard.GPT_TP_PLAN`); everything else is
    `tp_model.TPCausalSelfAttention`. Returns the largest absolute difference from the dense
    `model.CausalSelfAttention` (n_embd 48, n_head 6, so p must divide 6; rounding only at p = 1).
    """
    attn, x = _attention_case(seed)

    def rank(group):
        module = TPCausalSelfAttention.from_dense(attn, group=group)
        module.c_attn.weight.copy_(attn.c_attn.weight.chunk(p, dim=0)[group.rank])  # the mistake
        module.c_attn.bias.copy_(attn.c_attn.bias.chunk(p, dim=0)[group.rank])
        return module(x)

    with torch.no_grad():
        y = attn(x)
        outs = run_threads(rank, p)
    return _max_error(outs, y)


# --- chapter 7: the table of controls ---


def row_parallel_bias_once(p: int = 2, seed: int = 0) -> float:
    """The correct counterpart of `row_parallel_bias_on_every_rank`, on the same layer and input.

    `layers.RowParallelLinear` adds the bias once, after the all-reduce. Returns the largest
    absolute difference from the dense nn.Linear(48, 16) over all ranks: float32 rounding only.
    """
    linear, x = _linear_and_input(seed)

    def rank(group):
        layer = RowParallelLinear.from_dense(linear, group=group)
        return layer(shard_tensor(x, group.rank, p, dim=-1))

    with torch.no_grad():
        return _max_error(run_threads(rank, p), linear(x))


def mlp_split_after_gelu(p: int = 2, seed: int = 0) -> float:
    """The correct counterpart of `mlp_split_before_gelu`, on the same MLP and input.

    `tp_model.TPMLP`: c_fc by columns, so GELU acts on final values, then c_proj by rows and one
    all-reduce. Returns the largest absolute difference from the dense MLP: float32 rounding only.
    """
    mlp, x = _mlp_case(seed)  # the very case mlp_split_before_gelu uses
    with torch.no_grad():
        return _max_error(run_threads(lambda g: TPMLP.from_dense(mlp, group=g)(x), p), mlp(x))


def attention_split_by_heads(p: int = 2, seed: int = 0) -> float:
    """The correct counterpart of `attention_contiguous_qkv_split`, on the same attention and input.

    `tp_model.TPCausalSelfAttention`: c_attn's rows split as the plan says, so each rank holds the
    q, k and v of its own heads. Returns the largest absolute difference: float32 rounding only.
    """
    attn, x = _attention_case(seed)  # the very case the mistake uses
    with torch.no_grad():
        return _max_error(run_threads(lambda g: TPCausalSelfAttention.from_dense(attn, group=g)(x), p), attn(x))


# (chapter, what is split, the mistake, the correct version): each pair runs on the same dense
# module and the same input, so their errors can stand side by side in one table.
CONTROLS = (
    (3, "row-parallel bias", row_parallel_bias_on_every_rank, row_parallel_bias_once),
    (4, "MLP: c_fc, GELU", mlp_split_before_gelu, mlp_split_after_gelu),
    (5, "attention: q/k/v", attention_contiguous_qkv_split, attention_split_by_heads),
)
