"""Megatron-style tensor parallelism for a nanoGPT-style GPT: the whole course in one file, torch only.

    torchrun --standalone --nproc-per-node 2 examples/tp_gpt.py    (p = 1, 2 or 4 processes: p must divide n_head)

Every rank builds the same dense GPT (one seed, float64), keeps its shard of each weight, runs the tensor-parallel
forward and backward and compares the logits, the loss and every gradient with the dense model's. Shapes: B, T, C
(batch, time, channels), nh heads, hs head size, p the tensor-parallel degree, r this rank.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

V, T, C, NH, L, B = 64, 16, 32, 4, 2, 2  # vocab, time (block size), channels, heads (p | NH), layers, batch


class GPT(nn.Module):  # dense, nanoGPT's names: wte, wpe, h[i].{ln_1, attn, ln_2, mlp}, ln_f, lm_head tied to wte
    def __init__(self):
        super().__init__()
        self.wte, self.wpe, self.ln_f = nn.Embedding(V, C), nn.Embedding(T, C), nn.LayerNorm(C)
        self.h = nn.ModuleList(nn.Module() for _ in range(L))
        for b in self.h:  # pre-LN blocks: x + attn(ln_1(x)), then x + mlp(ln_2(x))
            b.ln_1, b.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            b.attn = nn.ModuleDict(dict(c_attn=nn.Linear(C, 3 * C), c_proj=nn.Linear(C, C)))  # c_attn: q, k, v fused
            b.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C), c_proj=nn.Linear(4 * C, C)))
        self.lm_head = nn.Linear(C, V, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: named_parameters() lists it once, as wte.weight

    def forward(self, idx):  # (B, T) token ids -> (B, T, V) logits; pre-LN blocks
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for b in self.h:
            q, k, v = b.attn.c_attn(b.ln_1(x)).split(C, dim=2)  # 3 x (B, T, C)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + b.attn.c_proj(y)
            x = x + b.mlp.c_proj(F.gelu(b.mlp.c_fc(b.ln_2(x))))
        return self.lm_head(self.ln_f(x))


def _identity(ctx, x):  # the two tensor ops that f and g pair up (ctx: nothing is saved for the backward)
    return x.view_as(x)


def _all_reduce(ctx, x):  # the sum over the p ranks, into a new tensor
    dist.all_reduce(x := x.clone())
    return x


class _Copy(torch.autograd.Function):  # ch. 3 and 9: f = identity forward, all-reduce backward (g's conjugate)
    forward, backward = staticmethod(_identity), staticmethod(_all_reduce)  # in front of each column-parallel layer


class _Reduce(torch.autograd.Function):  # ch. 3 and 9: g = all-reduce forward, identity backward (f's conjugate)
    forward, backward = staticmethod(_all_reduce), staticmethod(_identity)  # after each row-parallel layer


def shard_rows(w, r, p, sections=1):  # rows [r*n/p, (r+1)*n/p) of each of `sections` row blocks (c_attn: q, k, v)
    return torch.cat([s.chunk(p)[r] for s in w.chunk(sections)])


def take_shard(name, t, r, p):  # rank r's piece of the dense parameter `name` (weights and gradients alike)
    if ".c_attn." in name or ".c_fc." in name:  # ch. 3: column-parallel, output rows (weight and bias)
        return shard_rows(t, r, p, sections=3 if ".c_attn." in name else 1)  # ch. 5: r's heads of q, k, v; ch. 4
    if name.endswith("c_proj.weight"):  # ch. 3 and 6: row-parallel, input columns
        return t.chunk(p, dim=1)[r]
    return t  # replicated: embeddings, layer norms, row-parallel biases (added once, after the all-reduce)


def tp_forward(P, idx, p):  # ch. 6: the full TP GPT on this rank's shards P; two all-reduces (g) per layer
    def ln(x, w, name):  # a LayerNorm over C, its parameters replicated
        return F.layer_norm(x, (C,), w[name + ".weight"], w[name + ".bias"])

    f, g = _Copy.apply, _Reduce.apply
    x = F.embedding(idx, P["wte.weight"]) + P["wpe.weight"][:T]  # (B, T, C) replicated
    for i in range(L):
        w = {n.removeprefix(f"h.{i}."): t for n, t in P.items()}  # layer i's parameters by their short names
        h = f(ln(x, w, "ln_1"))  # ch. 5: f in front of the column-parallel c_attn
        q, k, v = F.linear(h, w["attn.c_attn.weight"], w["attn.c_attn.bias"]).split(C // p, dim=2)  # 3 x (B, T, C/p)
        q, k, v = (t.view(B, T, NH // p, C // NH).transpose(1, 2) for t in (q, k, v))  # (B, nh/p, T, hs) own heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C // p)
        x = x + g(F.linear(y, w["attn.c_proj.weight"])) + w["attn.c_proj.bias"]  # all-reduce 1, then the bias once
        h = F.gelu(F.linear(f(ln(x, w, "ln_2")), w["mlp.c_fc.weight"], w["mlp.c_fc.bias"]))  # (B, T, 4C/p) sharded
        x = x + g(F.linear(h, w["mlp.c_proj.weight"])) + w["mlp.c_proj.bias"]  # ch. 4: GELU per shard; all-reduce 2
    return F.linear(ln(x, P, "ln_f"), P["wte.weight"])  # (B, T, V) replicated: the tied head


# ch. 8: one process per rank, started by torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE.
r, p, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
divisors = [d for d in range(1, NH + 1) if NH % d == 0]
if NH % p:  # checked before any process group exists; every rank says it (torchrun stops the rest at the first exit)
    sys.exit(f"n_head={NH} cannot be split over p={p} processes: run with --nproc-per-node in {divisors}")
if cuda := torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"]):
    torch.cuda.set_device(local)  # one GPU per rank and NCCL; else gloo on the CPU
dist.init_process_group("nccl" if cuda else "gloo")
torch.manual_seed(0)  # one seed on every rank: the same dense model and the same batch everywhere
dense = GPT().double().to(dev := torch.device(f"cuda:{local}" if cuda else "cpu"))  # float64, see the tolerance
idx, targets = torch.randint(V, (2, B, T)).to(dev)
P = {n: take_shard(n, t.detach(), r, p).clone().requires_grad_() for n, t in dense.named_parameters()}
logits_d, logits = dense(idx), tp_forward(P, idx, p)  # (B, T, V) each, the TP logits replicated on every rank
loss_d, loss = (F.cross_entropy(x.view(-1, V), targets.view(-1)) for x in (logits_d, logits))
(loss_d + loss).backward()  # two separate graphs. Ch. 9: f's backward all-reduces, g's passes the gradient on
pairs = {"logits": (logits, logits_d), "loss": (loss, loss_d)}  # and every gradient, the dense one sliced as its shard
pairs |= {f"grad {n}": (P[n].grad, take_shard(n, t.grad, r, p)) for n, t in dense.named_parameters()}
# Tolerance: float64 rounds at 1.1e-16 relative; a sum over K terms in another order (K <= 4C = 128 here, through
# L layers) drifts by about K * 1.1e-16 ~ 1e-14 of the tensor's largest magnitude at worst. 1e-10 of it leaves four
# orders of margin, while a wrong shard changes results by their own size (relative error ~ 1).
worst = torch.stack([torch.stack(((a - b).abs().max(), b.abs().max())) for a, b in pairs.values()])  # (checks, 2)
dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the largest over the ranks, so over each whole tensor (all shards)
diff, size = worst.T
bad = [f"FAIL {n}: |TP - dense| = {d:.1e} > 1e-10 x {s:.1e}" for n, d, s in zip(pairs, diff, size) if d > 1e-10 * s]
if r == 0:
    print(f"TP over p={p} process(es), backend {dist.get_backend()}, float64, n_layer={L} n_head={NH} n_embd={C}")
    print(f"largest |TP - dense|: logits {diff[0]:.1e}, loss {diff[1]:.1e}, gradients {diff[2:].max():.1e}")
    print("\n".join(bad) if bad else f"OK: logits, loss and all {len(diff) - 2} gradients match the dense model")
dist.destroy_process_group()
sys.exit(1 if bad else 0)  # the same code on every rank (`worst` was all-reduced), so torchrun reports it
