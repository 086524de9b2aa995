"""Column- and row-parallel linear layers, and the vocabulary-parallel embedding.

The linear layers are derived in chapter 3; chapters 4 and 5 build the parallel MLP and attention
from them. `VocabParallelEmbedding` is derived in chapter 10 (its tied partner, the head, is a
`ColumnParallelLinear` over the padded vocabulary). After
Megatron-LM's `mpu/layers.py`. Two ways to build one: the constructor draws the full (master)
weight from `generator` and keeps this rank's slice, so that the ranks together hold exactly the
dense layer Megatron would draw; `from_dense` builds the layer on the `meta` device (shapes only,
nothing drawn) and loads this rank's slice of a dense layer (`materialize`). Communication goes
through the f/g pairs of `comm` (or, with `ColumnParallelLinear`'s async_grad_all_reduce, through
the group's asynchronous all-reduce), so the same layer runs on `run_threads`, on real processes,
and (world_size 1) on one device.

A note on transposes: the layers compute Y = XA + b, but `F.linear(x, W, b)` computes X W^T + b,
with W = A^T of shape (out_features, in_features). So "A split by columns" splits W's dim 0, and
"A split by rows" splits W's dim 1.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from .comm import (
    copy_to_parallel_region,
    gather_from_parallel_region,
    reduce_from_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_parallel_region,
)
from .comm.mappings import SEQUENCE_DIM
from .model import check_token_ids
from .shard import divide, gather_tensors, pad_vocab_size, shard_tensor, vocab_range


def _master_weight(out_features, in_features, bias, device, dtype, generator):
    """nn.Linear's initialization, U(-1/sqrt(in), 1/sqrt(in)) for weight and bias, drawn in full."""
    bound = 1.0 / math.sqrt(in_features)
    w = torch.empty(out_features, in_features, device=device, dtype=dtype).uniform_(-bound, bound, generator=generator)
    b = (
        torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound, generator=generator)
        if bias
        else None
    )
    return w, b


def materialize(module: nn.Module, state_dict: dict, *, device, dtype=None) -> nn.Module:
    """`module`, built on the meta device, given storage on `device` (in `dtype`) and loaded from state_dict.

    load_state_dict is strict: every key, every shape. Parameters that were one tensor under two
    names (the tied wte/lm_head) are one tensor again afterwards. Returns `module`.
    """
    names = {}  # id of each parameter -> the names it goes by
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    if dtype is not None:
        module.to(dtype)
    module.to_empty(device=device)  # a new tensor for every name: ties are undone ...
    for first, *others in names.values():
        for name in others:  # ... and redone here
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, module.get_parameter(first))
    module.load_state_dict(state_dict)
    return module


class _LinearAsyncGradAllReduce(torch.autograd.Function):
    """f and Y = X W^T + b in one: forward the linear alone; backward starts the all-reduce of
    dL/dX = dL/dY W (async_op=True), computes dL/dW = dL/dY^T X and dL/db while it travels, then waits."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        started = None
        if need_x:  # (..., in) this rank's part of dL/dX; the sum over ranks is f's all-reduce, started now
            started = ctx.group.all_reduce(grad @ weight, tag="copy_to_parallel_region.backward", async_op=True)
        grad2d = grad.reshape(-1, grad.size(-1))  # (N, out/p)
        grad_w = grad2d.t() @ x.reshape(-1, x.size(-1)) if need_w else None  # (out/p, in), while it travels
        grad_b = grad2d.sum(0) if ctx.has_bias and need_b else None  # (out/p,)
        return None if started is None else started.wait(), grad_w, grad_b, None


class _LinearSequenceParallel(torch.autograd.Function):
    """The all-gather along T and Y = X W^T + b in one (chapter 11), saving only this rank's X_r for backward.

    forward: X = all-gather of the ranks' X_r (B, T/p, in) along T, Y = X W^T + b (B, T, out/p).
    backward (Megatron-LM's choice: keep T/p tokens, pay a second all-gather): X all-gathered again,
    dL/dW = dL/dY^T X, dL/db, and dL/dX = dL/dY W, a partial sum over this rank's out/p features,
    reduce-scattered along T: the sum over ranks, each keeping its own T/p tokens.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)  # x: (B, T/p, in), the 1/p of the input
        ctx.group, ctx.has_bias = group, bias is not None
        total = group.all_gather(x, dim=SEQUENCE_DIM, tag="column_parallel_sequence_parallel.forward")  # (B, T, in)
        return F.linear(total, weight, bias)  # (B, T, out/p)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad2d = grad.reshape(-1, grad.size(-1))  # (B*T, out/p)
        grad_x = grad_w = grad_b = None
        if need_w:  # the input again: the all-gather forward did, recomputed instead of saved
            total = ctx.group.all_gather(x, dim=SEQUENCE_DIM, tag="column_parallel_sequence_parallel.backward")
            grad_w = grad2d.t() @ total.reshape(-1, total.size(-1))  # (out/p, in)
        if ctx.has_bias and need_b:
            grad_b = grad2d.sum(0)  # (out/p,)
        if need_x:  # (B, T, in) partial over features -> (B, T/p, in) summed, own tokens
            tag = "column_parallel_sequence_parallel.backward"
            grad_x = ctx.group.reduce_scatter(grad @ weight, dim=SEQUENCE_DIM, tag=tag)
        return grad_x, grad_w, grad_b, None


class ColumnParallelLinear(nn.Module):
    """Y = XA + b, A split by columns: A = [A_1, ..., A_p], b = [b_1, ..., b_p].

    Rank r holds A_r (weight (out_features/p, in_features)) and computes Y_r = X A_r + b_r, its
    out_features/p output features: no communication in forward (X is replicated); backward
    all-reduces dL/dX, because each rank holds only its part of it. With gather_output the
    ranks' Y_r are all-gathered into the full Y. `stride` s: A's columns form s equal sections
    (q, k, v for attention's fused c_attn) and rank r holds its chunk of each.

    async_grad_all_reduce (Megatron-LM's asynchronous tensor-parallel all-reduce): backward starts
    the all-reduce of dL/dX with async_op=True and computes dL/dW and dL/db while it travels, then
    waits; it takes f's place (the same all-reduce, with f's tag). The forward and the results are
    the same (up to float32 rounding: other matmul shapes); it overlaps only on a group whose handle is not yet done.

    sequence_parallel (chapter 11): X arrives split along T, (B, T/p, in); forward all-gathers it
    along T in place of f, backward all-gathers it again for dL/dW (only X_r is saved) and
    reduce-scatters dL/dX along T in place of f's all-reduce. Not combined with async_grad_all_reduce.

    forward: copy_to_parallel_region (f) -> X A_r + b_r -> (gather_from_parallel_region).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        async_grad_all_reduce: bool = False,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
        generator=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group = group
        self.gather_output = gather_output
        self.stride = stride
        self.async_grad_all_reduce = async_grad_all_reduce
        self.sequence_parallel = sequence_parallel
        p = group.world_size
        if stride < 1 or out_features % stride != 0:
            raise ValueError(f"out_features={out_features} is not divisible by stride={stride}")
        self.out_features_per_rank = divide(out_features // stride, p, "out_features / stride") * stride
        w, b = _master_weight(out_features, in_features, bias, device, dtype, generator)
        self.weight = nn.Parameter(shard_tensor(w, group.rank, p, 0, stride))  # (out/p, in)
        self.bias = nn.Parameter(shard_tensor(b, group.rank, p, 0, stride)) if bias else None  # (out/p,)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        *,
        group,
        gather_output: bool = False,
        stride: int = 1,
        async_grad_all_reduce: bool = False,
        sequence_parallel: bool = False,
    ):
        """This rank's A_r and b_r of a dense nn.Linear, on its device and in its dtype; nothing drawn."""
        w, b, r, p = linear.weight, linear.bias, group.rank, group.world_size
        layer = cls(
            linear.in_features,
            linear.out_features,
            group=group,
            bias=b is not None,
            gather_output=gather_output,
            stride=stride,
            async_grad_all_reduce=async_grad_all_reduce,
            sequence_parallel=sequence_parallel,
            device="meta",
            dtype=w.dtype,
        )
        shard = {"weight": shard_tensor(w.detach(), r, p, 0, stride)}  # (out/p, in)
        if b is not None:
            shard["bias"] = shard_tensor(b.detach(), r, p, 0, stride)  # (out/p,)
        return materialize(layer, shard, device=w.device)

    def forward(self, x):
        if self.sequence_parallel and self.async_grad_all_reduce:
            raise ValueError(
                "sequence_parallel replaces the all-reduce that async_grad_all_reduce overlaps by a "
                "reduce-scatter: set one of them to False"
            )
        if self.sequence_parallel and self.group.world_size > 1:  # (B, T/p, in) -> all-gather along T inside
            y = _LinearSequenceParallel.apply(x, self.weight, self.bias, self.group)  # (B, T, out/p) sharded
        elif self.async_grad_all_reduce and self.group.world_size > 1:  # f inside: its all-reduce overlapped
            y = _LinearAsyncGradAllReduce.apply(x, self.weight, self.bias, self.group)  # (..., out/p) sharded
        else:
            x = copy_to_parallel_region(x, self.group)  # (..., in) replicated; f: all-reduce of grads in backward
            y = F.linear(x, self.weight, self.bias)  # (..., out/p) sharded on the last dim
        if self.gather_output:
            y = gather_from_parallel_region(y, self.group)  # (..., out) in rank order
            if self.stride > 1:  # rank order is [q_1 k_1 v_1 q_2 ...]; restore the dense [q k v]
                y = gather_tensors(y.chunk(self.group.world_size, dim=-1), dim=-1, stride=self.stride)
        return y

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"({self.out_features_per_rank} on rank {self.group.rank} of {self.group.world_size}), "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, stride={self.stride}"
            + (", async_grad_all_reduce=True" if self.async_grad_all_reduce else "")
            + (", sequence_parallel=True" if self.sequence_parallel else "")
        )


class RowParallelLinear(nn.Module):
    """Y = XA + b, A split by rows and X by columns: A = [A_1; ...; A_p], X = [X_1, ..., X_p].

    Rank r holds A_r (weight (out_features, in_features/p)) and computes the partial product
    X_r A_r; Y = sum_r X_r A_r + b is one all-reduce. b is replicated and added once, after the
    reduce (adding it on every rank before would add it p times). With input_is_parallel=False
    the layer takes the full X and keeps its own X_r first.

    sequence_parallel (chapter 11): the sum is reduce-scattered along T instead of all-reduced, so
    each rank gets Y for its own T/p tokens, (B, T/p, out); b is added to those. b's gradient is
    then this rank's tokens' part only: all-reduce it after backward (`TPGPT.all_reduce_sequence_parallel_grads`).

    forward: (scatter_to_parallel_region) -> X_r A_r -> reduce_from_parallel_region (g) -> + b.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
        generator=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group = group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.in_features_per_rank = divide(in_features, group.world_size, "in_features")
        w, b = _master_weight(out_features, in_features, bias, device, dtype, generator)
        self.weight = nn.Parameter(shard_tensor(w, group.rank, group.world_size, 1))  # (out, in/p)
        self.bias = nn.Parameter(b) if bias else None  # (out,) replicated

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, group, input_is_parallel: bool = True, sequence_parallel: bool = False):
        """This rank's A_r and the whole b of a dense nn.Linear, on its device and in its dtype; nothing drawn."""
        w, b = linear.weight, linear.bias
        layer = cls(
            linear.in_features,
            linear.out_features,
            group=group,
            bias=b is not None,
            input_is_parallel=input_is_parallel,
            sequence_parallel=sequence_parallel,
            device="meta",
            dtype=w.dtype,
        )
        shard = {"weight": shard_tensor(w.detach(), group.rank, group.world_size, 1)}  # (out, in/p)
        if b is not None:
            shard["bias"] = b.detach()  # (out,) replicated
        return materialize(layer, shard, device=w.device)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_parallel_region(x, self.group)  # (..., in/p) this rank's columns of X
        y = F.linear(x, self.weight)  # (..., out) a partial sum: this rank's X_r A_r
        if self.sequence_parallel:  # (B, T/p, out) this rank's tokens, summed: a reduce-scatter along T
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_parallel_region(y, self.group)  # (..., out) replicated; g: the one all-reduce
        if self.bias is not None:
            y = y + self.bias  # once, after the reduce
        return y

    def extra_repr(self):
        return (
            f"in_features={self.in_features} ({self.in_features_per_rank} on rank {self.group.rank} "
            f"of {self.group.world_size}), out_features={self.out_features}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}"
            + (", sequence_parallel=True" if self.sequence_parallel else "")
        )


class VocabParallelEmbedding(nn.Module):
    """Y = E[ids], the table split by rows (the vocabulary): E = [E_1; ...; E_p].

    The vocabulary of V ids is padded with zero rows to V_pad, a multiple of p (`shard.pad_vocab_size`;
    the padded ids never occur). Rank r holds the rows of ids [start, end) = [r V_pad/p, (r+1) V_pad/p),
    weight (V_pad/p, C). Each id is looked up on the one rank that owns it; on every other rank it
    gives a row of zeros (mask the foreign ids, clamp their local index to 0 so the lookup is legal,
    zero their rows), so the sum over ranks holds exactly the right row: one all-reduce of B*T*C
    numbers. Backward: identity through the all-reduce (g), then each rank adds dL/dY into its
    own ids' rows only (the zeroed rows pass no gradient).

    sequence_parallel (chapter 11): the partial rows are reduce-scattered along T instead of
    all-reduced, straight into the sequence-parallel region: (B, T/p, C), this rank's tokens.

    forward: mask -> local lookup -> zero foreign rows -> reduce_from_parallel_region (g).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        group,
        padded_vocab_size: int | None = None,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
        generator=None,
    ):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        p = group.world_size
        if padded_vocab_size is None:
            padded_vocab_size = pad_vocab_size(num_embeddings, p)
        if padded_vocab_size < num_embeddings:
            raise ValueError(
                f"padded_vocab_size={padded_vocab_size} is smaller than the vocabulary "
                f"num_embeddings={num_embeddings}; use shard.pad_vocab_size({num_embeddings}, {p})"
            )
        self.num_embeddings = num_embeddings  # V, the real ids 0 .. V-1
        self.padded_vocab_size = padded_vocab_size  # V_pad, divisible by p
        self.embedding_dim = embedding_dim
        self.group = group
        self.vocab_start, self.vocab_end = vocab_range(padded_vocab_size, group.rank, p)
        # nn.Embedding's initialization N(0, 1), drawn in full; the padding rows are zero
        w = torch.empty(padded_vocab_size, embedding_dim, device=device, dtype=dtype).normal_(generator=generator)
        w[num_embeddings:] = 0
        self.weight = nn.Parameter(shard_tensor(w, group.rank, p, 0))  # (V_pad/p, C)

    @classmethod
    def from_dense(
        cls, embedding: nn.Embedding, *, group, padded_vocab_size: int | None = None, sequence_parallel: bool = False
    ):
        """This rank's rows of a dense nn.Embedding, zeros for padding, on its device, in its dtype; none drawn."""
        w = embedding.weight.detach()
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            group=group,
            padded_vocab_size=padded_vocab_size,
            sequence_parallel=sequence_parallel,
            device="meta",
            dtype=w.dtype,
        )
        rows = w[layer.vocab_start : min(layer.vocab_end, layer.num_embeddings)]  # may be empty: all padding
        padding = w.new_zeros(layer.vocab_end - layer.vocab_start - rows.size(0), w.size(1))
        return materialize(layer, {"weight": torch.cat([rows, padding])}, device=w.device)  # (V_pad/p, C)

    def forward(self, ids):
        check_token_ids(ids, self.num_embeddings)  # a padding id has a row but is no token: refused
        foreign = (ids < self.vocab_start) | (ids >= self.vocab_end)  # (B, T) ids another rank owns
        local = (ids - self.vocab_start).masked_fill(foreign, 0)  # (B, T) in [0, V_pad/p)
        y = F.embedding(local, self.weight)  # (B, T, C) right rows for our ids, row 0 for the others
        y = y.masked_fill(foreign.unsqueeze(-1), 0.0)  # (B, T, C) zeros where another rank owns the id
        if self.sequence_parallel:  # (B, T/p, C) this rank's tokens: one reduce-scatter along T
            return reduce_scatter_to_sequence_parallel_region(y, self.group)
        return reduce_from_parallel_region(y, self.group)  # (B, T, C) replicated; g: one all-reduce

    def extra_repr(self):
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padded_vocab_size={self.padded_vocab_size} "
            f"(ids [{self.vocab_start}, {self.vocab_end}) on rank {self.group.rank} of {self.group.world_size})"
        )
