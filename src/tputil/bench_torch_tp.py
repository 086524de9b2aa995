"""PyTorch's own tensor parallelism on our dense GPT, for the benchmark (`tputil.bench`; chapter 15 later).

`torch_tp_model(dense, mesh, vocab_parallel=...)` copies the dense GPT, replaces each attention by
`SplitQKVAttention` and applies `parallelize_module` with a plan, `torch_tp_plan`. The plan is data,
one style per module path; the comments name the communication each choice causes.

Why the attention is replaced. nanoGPT's fused `c_attn` stacks q, k and v along its output features
[q | k | v]. `ColwiseParallel` cuts a weight into p contiguous row blocks, so rank 0 would get all
of q and half of k: the wrong thing (chapter 5 shows the check failing). DTensor has no strided
placement in its public API, so we do what Llama-style models do: three projections q, k, v, each
column-parallel, built from the three sections of c_attn (the same numbers). The attention then
counts its heads from the width it receives (nh/p heads on each rank), so one module serves the
dense model (p = 1) and every rank.

Weight tying. `parallelize_module` replaces each module's parameters by new DTensor parameters, one
module at a time, so wte and lm_head would end up as two separate copies: equal at first, but
trained apart (the dense model sums both gradients into one tensor). With the vocabulary-parallel
plan both are sharded the same way (Shard(0): rows of the vocabulary), so we tie them again after
parallelizing. With the replicated plan neither is touched and the tie survives.

The loss. With the vocabulary-parallel plan lm_head returns a DTensor sharded on the vocabulary
(`use_local_output=False`) and the dense model's own `F.cross_entropy` runs under
`torch.distributed.tensor.parallel.loss_parallel()`, which computes it without gathering the logits;
`loss.backward()` must run under it too (`forward_loss` and `train_step` below enter it).
"""

import copy
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

from .model import causal_attention


class SplitQKVAttention(nn.Module):
    """nanoGPT's attention with c_attn split into q_proj, k_proj and v_proj (the same weights).

    The number of heads comes from the width of q: C/hs heads dense, nh/p heads on each rank of a
    column-parallel split, so the same forward runs before and after `parallelize_module`.
    """

    def __init__(self, dense):
        super().__init__()
        C = dense.n_embd
        self.head_size = C // dense.n_head  # hs
        bias = dense.c_attn.bias is not None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(C, C, bias=bias) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):  # rows [i C, (i+1) C) of c_attn
                proj.weight.copy_(dense.c_attn.weight[i * C:(i + 1) * C])
                if bias:
                    proj.bias.copy_(dense.c_attn.bias[i * C:(i + 1) * C])
        self.c_proj = copy.deepcopy(dense.c_proj)
        self.resid_dropout = copy.deepcopy(dense.resid_dropout)
        self.dropout = dense.dropout

    def forward(self, x):
        B, T, _ = x.size()  # (B, T, C) replicated
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # each (B, T, C/p) sharded: this rank's heads
        nh = q.size(-1) // self.head_size  # heads on this rank
        q, k, v = (t.view(B, T, nh, self.head_size).transpose(1, 2) for t in (q, k, v))  # (B, nh/p, T, hs)
        y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, nh/p, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * self.head_size)  # (B, T, C/p) sharded
        return self.resid_dropout(self.c_proj(y))  # (B, T, C) replicated after RowwiseParallel's all-reduce


def torch_tp_plan(*, vocab_parallel: bool) -> dict:
    """The `parallelize_module` plan for our GPT (after `split_qkv`), module path -> style.

    Per layer, forward: one all-reduce after attn.c_proj and one after mlp.c_proj (RowwiseParallel
    turns their partial sums into a replicated output); backward: one all-reduce of dL/dx in front
    of the column-parallel projections (q, k, v together, as their inputs are the same tensor, and
    c_fc). vocab_parallel adds one all-reduce after the embedding (rows split over the vocabulary)
    and lm_head's logits stay sharded over the vocabulary for `loss_parallel`.
    """
    plan = {
        "transformer.h.*.attn.q_proj": ColwiseParallel(),  # (C) -> (C/p), this rank's heads; no comm in forward
        "transformer.h.*.attn.k_proj": ColwiseParallel(),
        "transformer.h.*.attn.v_proj": ColwiseParallel(),
        "transformer.h.*.attn.c_proj": RowwiseParallel(),  # (C/p) -> (C): all-reduce in forward
        "transformer.h.*.mlp.c_fc": ColwiseParallel(),  # (C) -> (4C/p)
        "transformer.h.*.mlp.c_proj": RowwiseParallel(),  # (4C/p) -> (C): all-reduce in forward
    }
    if vocab_parallel:
        # the embedding's rows split over the vocabulary: partial rows, summed by one all-reduce
        plan["transformer.wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        # logits (B, T, V/p) sharded over the vocabulary, kept as a DTensor for loss_parallel
        plan["lm_head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return plan


def split_qkv(dense) -> nn.Module:
    """A deep copy of the dense GPT with every attention a `SplitQKVAttention` (same numbers)."""
    model = copy.deepcopy(dense)
    for block in model.transformer.h:
        block.attn = SplitQKVAttention(block.attn)
    return model


def torch_tp_model(dense, mesh, *, vocab_parallel: bool) -> nn.Module:
    """This rank's model under PyTorch's tensor parallelism, from a dense GPT (left untouched)."""
    if dense.config.n_head % mesh.size() != 0:
        raise ValueError(f"n_head={dense.config.n_head} is not divisible by p={mesh.size()}")
    model = parallelize_module(split_qkv(dense), mesh, torch_tp_plan(vocab_parallel=vocab_parallel))
    if vocab_parallel:
        model.lm_head.weight = model.transformer.wte.weight  # tie again: one DTensor (V/p, C) per rank
    model.vocab_parallel = vocab_parallel
    return model


def _context(model):
    return loss_parallel() if getattr(model, "vocab_parallel", False) else nullcontext()


def forward_loss(model, idx, targets):
    """(logits, loss) of a `torch_tp_model`; the logits a DTensor sharded on V if vocab-parallel."""
    with _context(model):
        return model(idx, targets)


def full_logits(logits) -> torch.Tensor:
    """The full (B, T, V) logits as a plain tensor (one all-gather if they are a sharded DTensor)."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def local_value(t) -> torch.Tensor:
    """A plain tensor: a replicated DTensor's local copy, or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def train_step(model, optimizer, idx, targets):
    """zero_grad, forward, backward (under loss_parallel when vocab-parallel), optimizer step; the loss."""
    optimizer.zero_grad(set_to_none=True)
    with _context(model):
        _, loss = model(idx, targets)
        loss.backward()
    optimizer.step()
    return loss.detach()

