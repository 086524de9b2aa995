"""Chapter 15 (PyTorch's own API side by side): what the chapter's real processes run.

Every function here is a rank function for `tputil.launch.run_processes` (gloo on the CPU).
PyTorch's side is `bench.torch_tp` (the one implementation: q/k/v split, the plan, the re-tie);
ours is `tp_model.VocabParallelTPGPT`. Both start from the same dense float64 GPT.

- `side_by_side`: logits, loss and every gradient of PyTorch's TP and of ours against the dense
  model; the collectives of a forward and of a backward, by kind and bytes, on both sides; then
  PyTorch's sequence-parallel plan beside ours with sequence parallelism, layer by layer, and
  where PyTorch sums the norms' gradients (`ch15_sequence_parallel.compare`); then the pitfalls
  (fused c_attn cut contiguously, the tie lost, a dimension p does not divide, an unnamed mesh
  over a second process group), each failing and then fixed.
- `two_d_step`: a 2 x 2 mesh on 4 ranks (TP inside, data parallelism across); one training step's
  gradients against the dense model's on the whole batch.
"""

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

from ..bench import torch_tp as btp
from ..model import GPTConfig, causal_attention, untrained_gpt
from ..shard import divide, shard_state_dict
from ..tp_model import VocabParallelTPGPT
from . import ch15_sequence_parallel as ch15_sp


def config_and_batch(seed=0, B=2, **config):
    """The chapter's small GPT (float64) and one batch (x, y) drawn from `seed`."""
    cfg = GPTConfig(**{**dict(block_size=8, vocab_size=32, n_layer=2, n_head=4, n_embd=32), **config})
    dense = untrained_gpt(cfg, seed).double().train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(cfg.vocab_size, (B, cfg.block_size), generator=g)
    y = torch.randint(cfg.vocab_size, (B, cfg.block_size), generator=g)
    return dense, x, y


def dense_grads(dense, x, y):
    """(logits, loss, {name: grad}) of the dense model on (x, y); the model's grads are left cleared."""
    dense.zero_grad(set_to_none=True)
    logits, loss = dense(x, y)
    loss.backward()
    grads = {n: w.grad.clone() for n, w in dense.named_parameters()}
    dense.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach(), grads


def torch_grads_as_dense(model) -> dict:
    """A torch_tp_model's gradients under the dense names, full tensors (q, k, v stacked into c_attn)."""
    return torch_as_dense({n: w.grad for n, w in model.named_parameters()})


def torch_as_dense(tensors: dict) -> dict:
    """{name: tensor} of a torch_tp_model (gradients, weights) as full tensors under the dense names."""
    full = {n: btp.full_logits(t) for n, t in tensors.items()}
    out = {}
    for n, g in full.items():
        if ".attn.q_proj." in n:
            stem, kind = n.split(".attn.q_proj.")
            parts = [full[f"{stem}.attn.{k}_proj.{kind}"] for k in "qkv"]
            out[f"{stem}.attn.c_attn.{kind}"] = torch.cat(parts)
        elif ".attn.k_proj." not in n and ".attn.v_proj." not in n:
            out[n] = g
    return out  # tied: one parameter, under wte's name (as the dense model's named_parameters gives it)


def _max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise KeyError(f"different parameters: {sorted(a.keys() ^ b.keys())}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class FusedQKVAttention(btp.SplitQKVAttention):
    """The mistake: the fused c_attn kept, its (local) output cut into three equal parts for q, k, v."""

    def __init__(self, dense):
        super().__init__(dense)
        del self.q_proj, self.k_proj, self.v_proj
        self.c_attn = copy.deepcopy(dense.c_attn)

    def forward(self, x, kv=None):
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # on a rank: its contiguous third... of the wrong rows
        nh = q.size(-1) // self.head_size
        q, k, v = (t.reshape(B, T, nh, self.head_size).transpose(1, 2) for t in (q, k, v))
        y = causal_attention(q, k, v, dropout=self.attn_dropout)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, nh * self.head_size)))


def _fused_model(dense, mesh):
    model = copy.deepcopy(dense)
    for block in model.transformer.h:
        block.attn = FusedQKVAttention(block.attn)
    plan = {k: v for k, v in btp.torch_tp_plan(vocab_parallel=False).items() if "_proj" not in k or "c_proj" in k}
    plan["transformer.h.*.attn.c_attn"] = ColwiseParallel()
    return parallelize_module(model, mesh, plan)


def side_by_side(group, seed=0):
    """One rank: PyTorch's TP and ours against the dense model, their collectives, the pitfalls."""
    p, rank = group.world_size, group.rank
    dense, x, y = config_and_batch(seed)
    want_logits, want_loss, want = dense_grads(dense, x, y)
    out = dict(p=p, dtype=str(next(dense.parameters()).dtype))

    # ours
    ours = VocabParallelTPGPT.from_dense(dense, group=group)
    with group.stats.measure() as fwd:
        logits, loss = ours(x, y)
    with group.stats.measure() as bwd:
        loss.backward()
    mine = {n: w.grad for n, w in ours.named_parameters()}
    shard = shard_state_dict(want, dense.config, rank, p, plan=ours.plan)
    out["ours"] = dict(
        logits=float((ours.gather_logits(logits.detach()) - want_logits).abs().max()),
        loss=abs(float(loss.detach() - want_loss)),
        grads=_max_diff({n: mine[n] for n in mine}, {n: shard[n] for n in mine}),
        fwd=(dict(fwd.calls), dict(fwd.bytes)),
        bwd=(dict(bwd.calls), dict(bwd.bytes)),
    )

    # PyTorch's
    mesh = init_device_mesh("cpu", (p,), mesh_dim_names=("tp",))
    model = btp.torch_tp_model(dense, mesh, vocab_parallel=True)
    with btp.CollectiveLog() as f_log, CommDebugMode() as f_mode, loss_parallel():
        logits, loss = model(x, y)
    with btp.CollectiveLog() as b_log, CommDebugMode() as b_mode, loss_parallel():
        loss.backward()
    out["torch"] = dict(
        logits=float((btp.full_logits(logits.detach()) - want_logits).abs().max()),
        loss=abs(float(btp.local_value(loss.detach()) - want_loss)),
        grads=_max_diff(torch_grads_as_dense(model), want),
        fwd=(f_log.calls, f_log.bytes),
        bwd=(b_log.calls, b_log.bytes),
        debug_fwd={str(k): v for k, v in f_mode.get_comm_counts().items()},
        debug_bwd={str(k): v for k, v in b_mode.get_comm_counts().items()},
        tied=model.lm_head.weight is model.transformer.wte.weight,
    )
    # PyTorch's with sequence parallelism beside ours with it (chapter 11): ch15_sequence_parallel
    out["torch_sp"] = ch15_sp.compare(group, mesh, dense, x, y, want_logits, want_loss, want, torch_as_dense)
    out["pitfalls"] = _pitfalls(dense, x, y, mesh, want_logits, want, group)
    return out


def _pitfalls(dense, x, y, mesh, want_logits, want, group):
    p, res = mesh.size(), {}
    # 1. ColwiseParallel on the fused c_attn: rank 0 gets q and half of k, and nothing complains
    with torch.no_grad():
        fused, _ = _fused_model(dense, mesh)(x, y)
    res["fused_c_attn"] = float((fused - want_logits).abs().max())

    # 2. the tie: parallelize_module gives wte and lm_head parameters of their own
    untied = parallelize_module(btp.split_qkv(dense), mesh, btp.torch_tp_plan(vocab_parallel=True))
    with loss_parallel():
        _, loss = untied(x, y)
        loss.backward()
    g = torch_grads_as_dense(untied)
    tied = want["transformer.wte.weight"]  # the dense model's: the sum of the embedding's and the head's parts
    res["untied"] = dict(
        same_tensor=untied.lm_head.weight is untied.transformer.wte.weight,
        wte_grad=float((g["transformer.wte.weight"] - tied).abs().max()),
        head_grad=float((g["lm_head.weight"] - tied).abs().max()),
        summed=float((g["transformer.wte.weight"] + g["lm_head.weight"] - tied).abs().max()),
    )

    # 3. a dimension p does not divide: DTensor shards unevenly (torch.chunk's sizes); ours refuses
    d = distribute_tensor(torch.arange(5.0, dtype=torch.float64).view(5, 1).expand(5, 2).contiguous(), mesh, [Shard(0)])
    try:
        divide(5, p, "rows")
        refused = None
    except ValueError as exc:
        refused = str(exc)
    try:
        btp.torch_tp_model(
            untrained_gpt(GPTConfig(n_head=3, n_embd=48, n_layer=1, vocab_size=32)), mesh, vocab_parallel=False
        )
        heads = None
    except ValueError as exc:
        heads = str(exc)
    res["uneven"] = dict(local_rows=d.to_local().shape[0], full=d.full_tensor().shape[0], ours=refused, heads=heads)

    # 4. a mesh over a second process group: unnamed it equals a mesh over the default group, and
    # DTensor's sharding cache hands back that mesh (and its group) for the result; named, its own
    pg = dist.new_group(list(range(p)), backend="gloo")
    plain = DeviceMesh("cpu", list(range(p)))  # over the default group
    res["meshes"] = {}
    for name, dims in (("unnamed", None), ("named", ("tp_other",))):
        other = DeviceMesh.from_group(pg, "cpu", mesh_dim_names=dims)
        ones = torch.ones(4, 4, dtype=torch.float64)
        for m in (plain, other):  # the same op on the default mesh first, then on the other one
            out = distribute_tensor(ones, m, [Shard(1)]) @ distribute_tensor(ones, m, [Shard(0)])
        res["meshes"][name] = dict(
            equals_plain=other == plain,
            own_group=other.get_group() is pg,
            result_mesh_is_plain=out.device_mesh is plain,
            result_group_is_pg=out.device_mesh.get_group() is pg,
        )
    return res


def two_d_step(group, seed=0):
    """One rank of a 2 x 2 mesh (dp, tp): PyTorch's TP inside each pair, data parallelism across.

    Each data-parallel replica takes half the batch; gradients are averaged over "dp" with one
    all-reduce per parameter's local shard. Returns the largest difference from the dense model's
    gradients on the whole batch, and the loss's.
    """
    if group.world_size != 4:
        raise ValueError(
            f"two_d_step runs on 4 ranks (a 2 x 2 mesh), not {group.world_size}: run_processes(two_d_step, 4)"
        )
    dense, x, y = config_and_batch(seed, B=4)
    _, want_loss, want = dense_grads(dense, x, y)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh.get_local_rank("dp")
    model = btp.torch_tp_model(dense, mesh["tp"], vocab_parallel=True)
    half = slice(2 * dp, 2 * dp + 2)
    with loss_parallel():
        _, loss = model(x[half], y[half])
        loss.backward()
    dp_group = mesh.get_group("dp")
    for w in model.parameters():
        local = btp.local_value(w.grad)
        dist.all_reduce(local, group=dp_group)
        local /= 2
    loss = btp.local_value(loss.detach()).clone()
    dist.all_reduce(loss, group=dp_group)
    return dict(
        dp=dp,
        tp=mesh.get_local_rank("tp"),
        grads=_max_diff(torch_grads_as_dense(model), want),
        loss=abs(float(loss / 2 - want_loss)),
    )
