"""Overlapping communication with computation: the same tensor-parallel GPT, its all-reduces hidden.

Used by the benchmark (`tputil.bench`, chapter 8); an optional way to run a `TPGPT` or a
`VocabParallelTPGPT`, with the same parameters and the same results (up to float32 rounding:
`tests/test_overlap.py`). The teaching layers stay as they are.

Under tensor parallelism every all-reduce sits on the critical path: the row-parallel output is
needed by the very next op (the residual add), so the rank waits. Two ways around the wait:

1. Forward: split the sequence into `chunks` micro-chunks of T/chunks positions and run them as
   interleaved streams. A stream runs until its next all-reduce, starts it (`async_op=True`) and
   hands over to the next stream; when its turn comes again it waits for its result (by then
   usually there) and goes on. Chunk k's attention needs the keys and values of chunks 0..k of the
   same layer; the round-robin order guarantees that the earlier chunks have computed them.
   Splitting by positions, not by sequences, works for any batch (GPT-2's B = 1 too).
2. Backward (after Megatron-LM's asynchronous gradient all-reduce): the column-parallel layer's f
   all-reduces dL/dX in backward; we start it and compute dL/dW and dL/db while it travels.

Each stream's forward is a generator that yields every partial sum to be all-reduced and receives
the sum; `_run_streams` is the scheduler. Collectives are issued in the same order on every rank.
On a group without asynchronous collectives (`ThreadGroup`, and `ShmGroup`, whose all-reduce costs
too little to hide) the all-reduces are simply synchronous.

What it costs: every chunk makes its own all-reduces (2 per layer, chunks times B*T*C/chunks
numbers), in the backward too, and each is a wait the rank may have to be woken from. On a busy
machine a rank woken after some compute waits milliseconds for a core (measured on 2 cores: 5 ms
instead of 0.6 ms per all-reduce), so the benchmark uses 2 chunks for the forward and 1 for the
training step (`bench_ranks.OVERLAP_CHUNKS`). Not overlapped: the vocabulary-parallel loss's three
all-reduces of B*T numbers (they are small, and the loss needs all positions). Dropout: as in
`tp_model`, not supported in training mode.
"""

import math
import time

import torch
import torch.distributed as dist
from torch.nn import functional as F

from ..comm import CallRecord


class _Pending:
    """An all-reduce in flight: `wait()` returns the sum; the time spent launching and waiting is recorded."""

    def __init__(self, out, work, group, launch_seconds=0.0):
        self.out, self.work, self.group, self.launch_seconds = out, work, group, launch_seconds

    def wait(self):
        if self.work is not None:
            start = time.perf_counter()
            self.work.wait()
            _record(self.group, self.launch_seconds + time.perf_counter() - start)
            self.work = None
        return self.out


def _record(group, seconds):
    """Tell a group that times its collectives (`bench_ranks.TimedGroup`) the exposed time of one of them."""
    if hasattr(group, "record_seconds"):
        group.record_seconds(seconds)


def _start_all_reduce(t, group, tag) -> _Pending:
    """All-reduce (sum) of t into a new tensor, started asynchronously on a DistGroup, counted."""
    if group.world_size == 1:
        return _Pending(t, None, group)
    if not getattr(group, "async_all_reduce", False):  # ThreadGroup, ShmGroup
        return _Pending(group.all_reduce(t, tag=tag), None, group)  # synchronous, counted by the group
    start = time.perf_counter()
    out = t.detach().clone()
    work = dist.all_reduce(out, group=group.process_group, async_op=True)
    group.stats.record(CallRecord("all_reduce", tuple(t.shape), t.dtype, t.numel() * t.element_size(), tag))
    return _Pending(out, work, group, time.perf_counter() - start)


class _ReduceStart(torch.autograd.Function):
    """g, split in two: forward starts the all-reduce (the result is read after `box[0].wait()`); backward identity."""

    @staticmethod
    def forward(ctx, partial, group, box):
        pending = _start_all_reduce(partial, group, "overlap.reduce.forward")
        box.append(pending)
        return pending.out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ColumnLinearAsyncGrad(torch.autograd.Function):
    """f then Y = X W^T + b, whose backward all-reduces dL/dX while it computes dL/dW and dL/db."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight  # (..., in) this rank's part of dL/dX
        pending = _start_all_reduce(grad_x, ctx.group, "overlap.copy.backward")
        grad2d = grad.reshape(-1, grad.size(-1))  # (N, out/p)
        grad_w = grad2d.t() @ x.reshape(-1, x.size(-1))  # (out/p, in), while the all-reduce travels
        grad_b = grad2d.sum(0) if ctx.has_bias else None
        return pending.wait(), grad_w, grad_b, None


def _column(x, layer):
    """A ColumnParallelLinear without gather: (..., in) replicated -> (..., out/p) sharded."""
    return _ColumnLinearAsyncGrad.apply(x, layer.weight, layer.bias, layer.group)


def _attention_chunk(q, k, v, start):
    """Causal attention of the queries at positions [start, start + Tq) over keys at [0, S)."""
    Tq, S = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh/p, Tq, S)
    rows = torch.arange(start, start + Tq, device=q.device).unsqueeze(1)  # (Tq, 1) global positions
    mask = torch.arange(S, device=q.device).unsqueeze(0) <= rows  # (Tq, S) itself and the past
    att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
    return att @ v  # (B, nh/p, Tq, hs)


def _stream(model, idx, start, kv):
    """One chunk's forward (positions [start, start + Tc)) as a generator: yields partial sums, gets sums.

    kv[layer] collects the keys and values of the chunks so far. Returns (x after ln_f, None).
    """
    t, group = model.transformer, model.group
    B, Tc = idx.size()
    pos = torch.arange(start, start + Tc, device=idx.device)  # (Tc,)
    wte = t.wte
    if hasattr(wte, "vocab_start"):  # VocabParallelEmbedding: this rank's rows, zeros elsewhere, then sum
        foreign = (idx < wte.vocab_start) | (idx >= wte.vocab_end)
        local = F.embedding((idx - wte.vocab_start).masked_fill(foreign, 0), wte.weight)
        tok = yield local.masked_fill(foreign.unsqueeze(-1), 0.0)  # (B, Tc, C) summed over ranks
    else:
        tok = wte(idx)  # (B, Tc, C) replicated
    x = t.drop(tok + t.wpe(pos))  # (B, Tc, C)
    for layer, block in enumerate(t.h):
        a = block.attn
        qkv = _column(block.ln_1(x), a.c_attn)  # (B, Tc, 3C/p)
        q, k, v = (z.view(B, Tc, a.n_head, a.head_size).transpose(1, 2) for z in qkv.chunk(3, dim=2))
        kv[layer][0].append(k)
        kv[layer][1].append(v)
        y = _attention_chunk(q, torch.cat(kv[layer][0], dim=2), torch.cat(kv[layer][1], dim=2), start)
        y = y.transpose(1, 2).contiguous().view(B, Tc, a.n_head * a.head_size)  # (B, Tc, C/p)
        y = yield F.linear(y, a.c_proj.weight)  # (B, Tc, C) partial, then summed
        x = x + (y + a.c_proj.bias if a.c_proj.bias is not None else y)
        m = block.mlp
        h = m.gelu(_column(block.ln_2(x), m.c_fc))  # (B, Tc, 4C/p)
        y = yield F.linear(h, m.c_proj.weight)  # (B, Tc, C)
        x = x + (y + m.c_proj.bias if m.c_proj.bias is not None else y)
    return t.ln_f(x)


def _run_streams(streams, group):
    """Round-robin: each stream runs to its next all-reduce, starts it, and passes; returns their results."""
    results, inbox, pending = [None] * len(streams), [None] * len(streams), [None] * len(streams)
    live = list(range(len(streams)))
    while live:
        for k in list(live):
            if pending[k] is not None:
                started, out = pending[k]
                started.wait()  # out, the autograd output of the all-reduce, now holds the sum
                inbox[k], pending[k] = out, None
            try:
                partial = streams[k].send(inbox[k])
            except StopIteration as stop:
                results[k] = stop.value
                live.remove(k)
                continue
            box = []
            out = _ReduceStart.apply(partial, group, box)
            pending[k] = (box[0], out)
    return results


def overlapped_forward(model, idx, targets=None, *, chunks: int = 2):
    """model(idx, targets) for a TPGPT or VocabParallelTPGPT, with communication overlapped (see above).

    Returns what the model returns: (logits, loss or None), the logits sharded for the
    vocabulary-parallel model. `chunks` must divide T; 1 still overlaps the backward.
    """
    if model.training and model.config.dropout > 0:
        raise ValueError("overlapped_forward: dropout in training mode is not supported (see tp_model)")
    B, T = idx.size()
    if T > model.config.block_size or T % chunks != 0:
        raise ValueError(f"overlapped_forward: T={T} must be <= block_size={model.config.block_size} "
                         f"and divisible by chunks={chunks}")
    Tc = T // chunks
    kv = [([], []) for _ in model.transformer.h]
    streams = [_stream(model, idx[:, i * Tc:(i + 1) * Tc], i * Tc, kv) for i in range(chunks)]
    x = torch.cat(_run_streams(streams, model.group), dim=1)  # (B, T, C) after ln_f
    head = model.lm_head
    logits = _column(x, head) if hasattr(head, "group") else head(x)  # (B, T, V_pad/p) or (B, T, V)
    loss = None if targets is None else model.loss(logits, targets)
    return logits, loss
