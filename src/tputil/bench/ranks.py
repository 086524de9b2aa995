"""The benchmark's rank side: what each of the p processes of `bench.run_bench` does.

Every rank builds the same dense GPT from a fixed seed, builds each variant from it (`_build`),
checks every variant against the dense model, then times them in interleaved rounds
(`_bench_size`); `worker` is the function `launch.run_processes` runs. See `bench` for the
variants.

Correctness guard, before any timing: every variant's logits (gathered) and loss must equal the
dense model's, the loss of its first training step too, and its loss after that step must equal
the dense model's after the same step (so the gradients were right). Tolerances `LOGITS_TOL` and
`LOSS_TOL`: float32 sums in another order differ in the last bits (about 1e-6 here), while a real
bug (a wrong q/k/v split, a bias added twice) moves them by 1e-2 or more. A failure raises
`BenchCorrectnessError` and nothing is timed.

Time inside collectives: ours call by call, from the group's own records
(`group.stats.measure(timed=True)`: per call the time it kept the rank, for an asynchronous
all-reduce its launch plus its wait); PyTorch's from the profiler during the guard's step and
second forward (its `_c10d_functional` ops, launches and waits), so the two are comparable only
roughly. Every rank lines up with the others before each timed run (`timing.line_up`).
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..comm import DistGroup, ShmGroup
from ..model import untrained_gpt
from .timing import line_up, seconds
from .torch_tp import local_value

LOGITS_TOL = dict(rtol=1e-4, atol=1e-4)
LOSS_TOL = dict(rtol=0.0, atol=1e-4)


class BenchCorrectnessError(AssertionError):
    """A variant's logits or loss differ from the dense model's: its timing would be worthless."""


def check_close(what, got, want, tol):
    """torch.testing.assert_close, raising BenchCorrectnessError with `what` in the message."""
    try:
        torch.testing.assert_close(got.detach().float().cpu(), want.detach().float().cpu(), **tol)
    except AssertionError as exc:
        raise BenchCorrectnessError(f"correctness guard: {what} differs from the dense model: {exc}") from None


def dense_model(config, seed=0, device=None):
    """The benchmark's dense GPT: `model.untrained_gpt` (biases and norms perturbed, so that a misplaced
    one shows; the blocks GPT-2's init), in training mode, on `device`."""
    return untrained_gpt(config, seed, block_std=None).train().to(device)


def _batch(size, seed, device):
    g = torch.Generator().manual_seed(seed + 1)
    shape = (size.batch, size.config.block_size)
    x = torch.randint(size.config.vocab_size, shape, generator=g)
    y = torch.randint(size.config.vocab_size, shape, generator=g)
    return x.to(device), y.to(device)


def _optimizer(model):
    """AdamW with its fused kernel for every variant (4 to 5 times faster than the per-tensor loop at
    GPT-2 size). Fused AdamW takes DTensors, but not DTensors and tensors mixed in one param group
    (PyTorch's TP keeps the norms as plain tensors), so the parameters are grouped by kind."""
    from torch.distributed.tensor import DTensor

    groups = {}
    for p in model.parameters():
        groups.setdefault(isinstance(p, DTensor), []).append(p)
    return torch.optim.AdamW([{"params": ps} for ps in groups.values()], lr=1e-3, weight_decay=0.1, fused=True)


@dataclass
class _Runner:
    """One variant on this rank: a forward, a training step, the full logits from what forward returns."""

    forward: object
    step: object
    full_logits: object
    group: object = None  # ours: the DistGroup or ShmGroup whose timed records are its comm time
    torch_tp: bool = False


def _train_step(forward, optimizer):
    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        _, loss = forward(x, y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _build(key, dense, groups, meshes, *, sabotage=None) -> _Runner:
    from ..layers import ColumnParallelLinear
    from ..tp_model import TPGPT, VocabParallelTPGPT
    from . import torch_tp as btp

    if key.startswith("dense"):
        return _Runner(dense, _train_step(dense, _optimizer(dense)), lambda t: t)
    if key.startswith("torch"):
        mesh = meshes["shm" if key.endswith("_shm") else "gloo"]
        model = btp.torch_tp_model(dense, mesh, vocab_parallel=key.startswith("torch_vocab"))
        opt = _optimizer(model)
        return _Runner(
            lambda x, y: btp.forward_loss(model, x, y),
            lambda x, y: btp.train_step(model, opt, x, y),
            btp.full_logits,
            torch_tp=True,
        )
    group = groups["shm" if key.endswith("_shm") else "gloo"]
    cls = TPGPT if key.startswith("ours_rep") else VocabParallelTPGPT
    model = cls.from_dense(dense, group=group, async_grad_all_reduce=key == "ours_overlap")
    if sabotage == key:  # deliberately wrong: c_attn cut into contiguous rows instead of per q/k/v section
        for block, dense_block in zip(model.transformer.h, dense.transformer.h):
            block.attn.c_attn = ColumnParallelLinear.from_dense(
                dense_block.attn.c_attn, group=group, stride=1, async_grad_all_reduce=model.async_grad_all_reduce
            )
    return _Runner(model, _train_step(model, _optimizer(model)), model.gather_logits, group)


def _torch_comm_seconds(prof):
    return (
        sum(
            e.cpu_time_total
            for e in prof.events()
            if e.name.startswith("_c10d_functional::") and "wrap_tensor" not in e.name
        )
        / 1e6
    )


def _bench_size(size, groups, meshes, repeats, seed, variants, sabotage, device, threads):
    """One model size on this rank: build, guard, then interleaved timed rounds; returns the raw timings."""
    from torch.profiler import ProfilerActivity, profile

    rank, p = groups["gloo"].rank, groups["gloo"].world_size
    dense = dense_model(size.config, seed, device)
    x, y = _batch(size, seed, device)
    keys = [k for k in variants if rank == 0 or not k.startswith("dense")]  # dense ones run on rank 0 only
    runners = {k: _build(k, dense, groups, meshes, sabotage=sabotage) for k in keys if k != "dense1"}
    if "dense1" in keys:
        runners["dense1"] = runners["dense"]  # the same model and optimizer, on 1 thread
    raw = {k: {m: [] for m in ("fwd", "step", "comm_fwd", "comm_step", "calls_fwd", "calls_step")} for k in variants}

    def measure(key, phase, *, record=True, profiled=False):
        """Run `key`'s forward or step once with all ranks starting together; return its result."""
        line_up(groups["gloo"])  # the ranks that sit out a dense run wait here, idle (gloo blocks, not spins)
        if key not in runners:
            return None
        r = runners[key]
        torch.set_num_threads({"dense": threads * p, "dense1": 1}.get(key, threads))
        comm = r.group.stats.measure(timed=True) if r.group else nullcontext()
        with torch.no_grad() if phase == "fwd" else torch.enable_grad():
            with profile(activities=[ProfilerActivity.CPU]) if profiled else nullcontext() as prof, comm as m:
                elapsed, out = seconds(lambda: (r.forward if phase == "fwd" else r.step)(x, y), device)
        torch.set_num_threads(threads)
        calls = [rec.seconds for rec in m.log] if r.group else []
        if profiled:
            raw[key]["comm_" + phase].append(_torch_comm_seconds(prof))
        if record:
            raw[key][phase].append(elapsed)
            if not r.torch_tp and not key.startswith("dense"):
                raw[key]["comm_" + phase].append(sum(calls))
                raw[key]["calls_" + phase].append(calls)
        return out

    # The guard (and warm-up): the dense reference on rank 0, sent to every rank; then each variant.
    ref = torch.zeros(3, device=device)
    if rank == 0:
        torch.set_num_threads(threads * p)  # as it will be timed: this is its warm-up too
        with torch.no_grad():
            ref_logits, ref_loss = dense(x, y)
        step_loss = runners["dense"].step(x, y)
        with torch.no_grad():
            ref = torch.stack([ref_loss, step_loss, dense(x, y)[1]]).float()
        torch.set_num_threads(threads)
    ref = groups["gloo"].broadcast(ref, src=0)
    if rank != 0:
        with torch.no_grad():
            ref_logits, _ = dense(x, y)  # rank 0's numbers, up to the rounding of its threads
    for key, r in runners.items():
        if key.startswith("dense"):
            continue
        logits, loss = measure(key, "fwd", record=False)
        check_close(f"{key}: logits", r.full_logits(logits), ref_logits, LOGITS_TOL)
        check_close(f"{key}: loss", local_value(loss), ref[0], LOSS_TOL)
        loss = measure(key, "step", record=False, profiled=r.torch_tp)
        check_close(f"{key}: loss of the first training step", local_value(loss), ref[1], LOSS_TOL)
        loss = measure(key, "fwd", record=False, profiled=r.torch_tp)[1]
        check_close(f"{key}: loss after one AdamW step", local_value(loss), ref[2], LOSS_TOL)

    for _ in range(repeats * size.rounds):  # every variant once per round, forwards first, then steps
        for phase in ("fwd", "step"):
            for key in variants:
                measure(key, phase)
    runners.clear()  # the models and their optimizer states go before the next size is built
    del dense
    return raw


def worker(group, sizes, repeats, seed, variants, sabotage):
    """Every rank: the whole benchmark; returns {size name: {variant: {measure: [per run]}}, "_info": ...}."""
    from torch.distributed.device_mesh import init_device_mesh

    from .torch_tp import shm_mesh

    device, threads = group.device, torch.get_num_threads()
    groups = dict(gloo=DistGroup())
    meshes = dict(gloo=init_device_mesh(device.type, (group.world_size,)))
    if any(k.startswith("ours") and k.endswith("_shm") for k in variants):
        groups["shm"] = ShmGroup(timeout=600.0)
    if any(k.startswith("torch") and k.endswith("_shm") for k in variants):  # a segment of its own
        meshes["shm"] = shm_mesh(ShmGroup(timeout=600.0))
    out = {s.name: _bench_size(s, groups, meshes, repeats, seed, variants, sabotage, device, threads) for s in sizes}
    out["_info"] = dict(backend=group.backend, threads=threads)
    return out
