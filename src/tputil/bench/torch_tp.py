"""PyTorch's own tensor parallelism on our dense GPT, for the benchmark (`tputil.bench`) and chapter 15.

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

The transport. PyTorch's TP sends its collectives through the mesh's process group: gloo on CPU.
`shm_mesh(shm_group)` gives it the same shared-memory all-reduce as ours (`comm.ShmGroup`), so the
two can be compared on equal terms: `ShmProcessGroup`, a process group written in Python (as
PyTorch's own tests do for their threaded one), all-reduces through the ShmGroup and passes every
other collective to a gloo group of the same ranks. The mesh gets a dimension name of its own:
DeviceMesh equality ignores process groups, so an unnamed shm mesh equals a gloo mesh over the same
ranks, and DTensor, having cached the gloo one, would send the collectives there.
"""

import copy
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._C._distributed_c10d import AllreduceOptions, _create_work_from_future
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.utils._python_dispatch import TorchDispatchMode  # private: hence here, in bench/

from ..comm import REDUCE_OPS
from ..model import causal_attention
from ..shard import divide


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
        w = dense.c_attn.weight  # the projections take its dtype and device (float64 in chapter 15)
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(C, C, bias=bias, dtype=w.dtype, device=w.device) for _ in range(3)
        )
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):  # rows [i C, (i+1) C) of c_attn
                proj.weight.copy_(dense.c_attn.weight[i * C : (i + 1) * C])
                if bias:
                    proj.bias.copy_(dense.c_attn.bias[i * C : (i + 1) * C])
        self.c_proj = copy.deepcopy(dense.c_proj)
        self.attn_dropout = copy.deepcopy(dense.attn_dropout)
        self.resid_dropout = copy.deepcopy(dense.resid_dropout)

    def forward(self, x, kv=None):
        """kv: a layer of a KV cache, as the dense attention takes; a cache is refused here."""
        if kv is not None:
            raise ValueError("SplitQKVAttention keeps no KV cache: generate with kv_cache=False")
        B, T, _ = x.size()  # (B, T, C) replicated
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # each (B, T, C/p) sharded: this rank's heads
        nh = q.size(-1) // self.head_size  # heads on this rank
        q, k, v = (t.view(B, T, nh, self.head_size).transpose(1, 2) for t in (q, k, v))  # (B, nh/p, T, hs)
        y = causal_attention(q, k, v, dropout=self.attn_dropout)  # (B, nh/p, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * self.head_size)  # (B, T, C/p) sharded
        return self.resid_dropout(self.c_proj(y))  # (B, T, C) replicated after RowwiseParallel's all-reduce


def torch_tp_plan(*, vocab_parallel: bool) -> dict:
    """The `parallelize_module` plan for our GPT (after `split_qkv`), module path -> style.

    Per layer, forward: one all-reduce after attn.c_proj and one after mlp.c_proj (RowwiseParallel
    turns their partial sums into a replicated output); backward: one all-reduce of dL/dx in front
    of each column-parallel projection (q, k and v one each, as each makes its own DTensor of the
    input, and c_fc: four per layer, where ours has two; chapter 15 counts them). vocab_parallel
    adds one all-reduce after the embedding (rows split over the vocabulary) and lm_head's logits
    stay sharded over the vocabulary for `loss_parallel`.
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


def torch_sp_plan() -> dict:
    """The vocabulary-parallel plan with sequence parallelism (chapter 11's idea, chapter 15 checks it).

    Between the tensor-parallel regions each rank keeps its T/p tokens (Shard(1)): the first block
    takes its chunk of the replicated embedding (no comm), the norms run on their shard
    (SequenceParallel), attention and the MLP all-gather their input (PrepareModuleInput), their
    c_proj reduce-scatters its output (RowwiseParallel to Shard(1)), lm_head all-gathers its input.
    """
    seq = (Shard(1), None)  # a block's and attention's inputs: (x, kv); kv stays None
    plan = torch_tp_plan(vocab_parallel=True)
    plan.update(
        {
            "transformer.h.0": PrepareModuleInput(
                input_layouts=(Replicate(), None), desired_input_layouts=seq, use_local_output=True
            ),
            "transformer.h.*.ln_1": SequenceParallel(),
            "transformer.h.*.ln_2": SequenceParallel(),
            "transformer.h.*.attn": PrepareModuleInput(input_layouts=seq, desired_input_layouts=(Replicate(), None)),
            "transformer.h.*.mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "transformer.h.*.attn.c_proj": RowwiseParallel(output_layouts=Shard(1)),
            "transformer.h.*.mlp.c_proj": RowwiseParallel(output_layouts=Shard(1)),
            "transformer.ln_f": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
        }
    )
    return plan


def split_qkv(dense) -> nn.Module:
    """A deep copy of the dense GPT with every attention a `SplitQKVAttention` (same numbers)."""
    model = copy.deepcopy(dense)
    for block in model.transformer.h:
        block.attn = SplitQKVAttention(block.attn)
    return model


def torch_tp_model(dense, mesh, *, vocab_parallel: bool, sequence_parallel: bool = False) -> nn.Module:
    """This rank's model under PyTorch's tensor parallelism, from a dense GPT (left untouched).

    sequence_parallel=True (vocab_parallel too): `torch_sp_plan`; T must be divisible by p.
    """
    divide(dense.config.n_head, mesh.size(), "n_head")  # the heads split over the ranks: the package's check
    if sequence_parallel and not vocab_parallel:
        raise ValueError("sequence_parallel=True needs vocab_parallel=True (torch_sp_plan extends that plan)")
    plan = torch_sp_plan() if sequence_parallel else torch_tp_plan(vocab_parallel=vocab_parallel)
    model = parallelize_module(split_qkv(dense), mesh, plan)
    if sequence_parallel:  # refuse a T that p does not divide before the first all-gather fails on one rank

        def check_tokens(_, args):
            divide(args[0].size(1), mesh.size(), "T")

        model.register_forward_pre_hook(check_tokens)
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


# PyTorch's functional collectives (what DTensor calls) -> our CommStats kinds
_KINDS = {
    "all_reduce": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "broadcast": "broadcast",
}


class CollectiveLog(TorchDispatchMode):
    """Counts PyTorch's functional collectives by kind and bytes (what this rank passes in), as CommStats.

    `log`: (kind, bytes) of each call in order. An op on DTensors is handed back to DTensor first
    (NotImplemented, as CommDebugMode does), so the collectives it runs inside (loss_parallel's, a
    Partial gradient reduced by the optimizer) pass through here too; otherwise the mode, disabled
    while it handles the op, would miss them.
    """

    def __init__(self):
        super().__init__()
        self.calls, self.bytes, self.log = {}, {}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        ns, name = func.namespace, func.__name__.split(".")[0]
        if ns == "_c10d_functional" and name in _KINDS:
            kind, t = _KINDS[name], args[0]
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self.bytes[kind] = self.bytes.get(kind, 0) + t.numel() * t.element_size()
            self.log.append((kind, t.numel() * t.element_size()))
        return func(*args, **(kwargs or {}))


class ShmProcessGroup(dist.ProcessGroup):
    """A torch.distributed process group: all-reduces through a ShmGroup, the rest through a gloo group."""

    def __init__(self, rank, world_size, gloo, shm):
        super().__init__(rank, world_size)
        self._gloo, self._shm = gloo, shm

    @property
    def group_name(self):  # the name torch.distributed registered it under (DeviceMesh asks for it)
        return dist.distributed_c10d._world.pg_names[self]

    def getBackendName(self):
        return _SHM_BACKEND

    def allreduce(self, tensor_list, opts=None):
        opts = AllreduceOptions() if opts is None else opts
        op = next((name for name in REDUCE_OPS if opts.reduceOp == getattr(dist.ReduceOp, name.upper())), None)
        if op is None:  # e.g. a product: gloo's
            return self._gloo.allreduce(tensor_list, opts)
        for t in tensor_list:  # in place, as torch.distributed's all-reduce is
            t.copy_(self._shm.all_reduce(t, op=op))
        done = torch.futures.Future()
        done.set_result(tensor_list)
        return _create_work_from_future(done)


def _to_gloo(name):
    def method(self, *args):
        return getattr(self._gloo, name)(*args)

    method.__name__ = name
    return method


for _name in (
    "broadcast",
    "allgather",
    "_allgather_base",
    "allgather_into_tensor_coalesced",
    "reduce_scatter",
    "_reduce_scatter_base",
    "reduce_scatter_tensor_coalesced",
    "scatter",
    "gather",
    "barrier",
    "alltoall_base",
    "allreduce_coalesced",
    "send",
    "recv",
):
    setattr(ShmProcessGroup, _name, _to_gloo(_name))

_SHM_BACKEND = "tputil_shm"
_making = []  # (gloo group, ShmGroup) for the ShmProcessGroup that shm_mesh is creating


def shm_mesh(shm_group) -> DeviceMesh:
    """A 1-D CPU DeviceMesh over shm_group's ranks whose all-reduces go through shm_group (every rank calls it)."""
    if not hasattr(dist.Backend, _SHM_BACKEND.upper()):
        dist.Backend.register_backend(
            _SHM_BACKEND,
            lambda store, rank, world_size, timeout: ShmProcessGroup(rank, world_size, *_making[-1]),
            devices=["cpu"],
        )
    ranks = dist.get_process_group_ranks(shm_group.process_group or dist.group.WORLD)
    _making.append((dist.new_group(ranks, backend="gloo"), shm_group))
    try:
        pg = dist.new_group(ranks, backend=_SHM_BACKEND)
    finally:
        _making.pop()
    return DeviceMesh.from_group(pg, "cpu", mesh_dim_names=("tp_shm",))  # named: not equal to a gloo mesh
