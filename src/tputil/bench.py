"""The benchmark: the dense GPT against ours on p = 2 processes against PyTorch's tensor parallelism.

Measured in chapter 8 (real processes) and discussed there. Run it as `python -m tputil.bench`
(or the `bench` sub-command of `python -m tputil`): a command, not a test; it prints one table.

One run starts p real processes (`launch.run_processes`, gloo on CPU), each with its share of the
cores as torch intra-op threads (1 each on a 2-core machine). Every rank builds the same dense GPT
from a fixed seed (biases and norms perturbed so that a misplaced one shows), and from it:

- `ours, replicated head`: `tp_model.TPGPT.from_dense`;
- `ours, vocab head`: `tp_vocab.VocabParallelTPGPT.from_dense` (the logits stay sharded);
- `ours, vocab head + overlap`: the same model run by `overlap.overlapped_forward`;
- `ours, ... , shm` (replicated or vocab head): the same models on a `comm.ShmGroup`, whose
  all-reduces go through shared memory instead of gloo's sockets (same results, bit for bit at p = 2);
- `torch TP, replicated head` and `torch TP, vocab + loss_parallel`: `parallelize_module` on the
  same dense model (`bench_torch_tp`); the latter is PyTorch's best plan for this model.

The dense model runs on rank 0 alone with all p ranks' threads while the others wait in a barrier
(idle: a gloo barrier blocks without spinning). Measurements are interleaved: in every round each
variant's forward runs once, then each variant's training step, so the rest of the machine's noise
hits them all alike. Forward: `model(idx, targets)` under no_grad (logits and loss). Step:
zero_grad, forward, backward, AdamW (`_optimizer`, the same for all). Times and the time inside
collectives are summarized by `bench_report` (the slowest rank, the median over the rounds).

Correctness guard, before any timing: every variant's logits (gathered) and loss must equal the
dense model's, the loss of its first training step too, and its loss after that step must equal
the dense model's after the same step (so the gradients were right). Tolerances `LOGITS_TOL` and
`LOSS_TOL`: float32 sums in another order differ in the last bits (about 1e-6 here), while a real
bug (a wrong q/k/v split, a bias added twice) moves them by 1e-2 or more. A failure raises
`BenchCorrectnessError` and nothing is timed.

Time inside collectives: ours with `TimedGroup` (`TimedShmGroup`), call by call; PyTorch's from the profiler during
the guard's step and second forward (its `_c10d_functional` ops, launches and waits), so the two
are comparable only roughly.
"""

import argparse
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from . import bench_report
from .bench_torch_tp import local_value
from .comm import DistGroup, ShmGroup
from .model import GPT, GPTConfig

LOGITS_TOL = dict(rtol=1e-4, atol=1e-4)
LOSS_TOL = dict(rtol=0.0, atol=1e-4)


@dataclass(frozen=True)
class BenchSize:
    name: str
    config: GPTConfig
    batch: int  # B sequences of config.block_size tokens
    rounds: int = 1  # timed rounds per requested repeat: small sizes are cheap, so they get more


SIZES = {
    "tiny": BenchSize("tiny", GPTConfig(n_layer=2, n_embd=128, n_head=4, vocab_size=256, block_size=128), 8, 5),
    "mid": BenchSize("mid", GPTConfig(n_layer=6, n_embd=384, n_head=6, vocab_size=256, block_size=256), 2, 2),
    "gpt2": BenchSize("gpt2", GPTConfig(n_layer=12, n_embd=768, n_head=12, vocab_size=50304, block_size=256), 1),
}

VARIANTS = {  # key -> (label, the PyTorch variant it is compared with)
    "dense": ("dense, 1 process", None),
    "dense1": ("dense, 1 process, 1 thread", None),  # not run by default: what the threads buy
    "ours_rep": ("ours, replicated head", "torch_rep"),
    "ours_vocab": ("ours, vocab head", "torch_vocab"),
    "ours_overlap": ("ours, vocab head + overlap", "torch_vocab"),
    "ours_rep_shm": ("ours, replicated head, shm", "torch_rep"),
    "ours_vocab_shm": ("ours, vocab head, shm", "torch_vocab"),
    "torch_rep": ("torch TP, replicated head", None),
    "torch_vocab": ("torch TP, vocab + loss_parallel", None),
}
DEFAULT_VARIANTS = tuple(k for k in VARIANTS if k != "dense1")
# ours + overlap: the sequence in 2 chunks for the forward (each chunk's all-reduces travel while the
# other chunk computes); 1 chunk in the training step, where only the backward's all-reduce of dL/dX
# overlaps with dL/dW: chunks double the backward's all-reduces, and on a busy machine every blocking
# all-reduce costs milliseconds of rescheduling (measured: 2 chunks made the step slower).
OVERLAP_CHUNKS = (2, 1)  # (forward, training step)


class BenchCorrectnessError(AssertionError):
    """A variant's logits or loss differ from the dense model's: its timing would be worthless."""


class _Timed:
    """Mixed into a DistGroup kind: records the wall time spent inside each collective in `durations` (s)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.durations = []

    def record_seconds(self, seconds):
        self.durations.append(seconds)

    def _timed(self, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.record_seconds(time.perf_counter() - start)
        return out

    def _all_reduce(self, t, op):
        return self._timed(super()._all_reduce, t, op)

    def _all_gather(self, t, dim):
        return self._timed(super()._all_gather, t, dim)

    def _reduce_scatter(self, t, dim):
        return self._timed(super()._reduce_scatter, t, dim)

    def _broadcast(self, t, src):
        return self._timed(super()._broadcast, t, src)


class TimedGroup(_Timed, DistGroup):
    """DistGroup, timed."""


class TimedShmGroup(_Timed, ShmGroup):
    """ShmGroup, timed."""


def check_close(what, got, want, tol):
    """torch.testing.assert_close, raising BenchCorrectnessError with `what` in the message."""
    try:
        torch.testing.assert_close(got.detach().float().cpu(), want.detach().float().cpu(), **tol)
    except AssertionError as exc:
        raise BenchCorrectnessError(f"correctness guard: {what} differs from the dense model: {exc}") from None


def dense_model(config, seed=0, device=None):
    """The dense GPT from a fixed seed, every bias and norm weight perturbed (GPT-2 inits them to 0 and 1)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(device)


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


# ------------------------------------------------------------------------ the worker (every rank)

@dataclass
class _Runner:
    """One variant on this rank: a forward, a training step, the full logits from what forward returns."""
    forward: object
    step: object
    full_logits: object
    group: object = None  # ours: the TimedGroup or TimedShmGroup whose durations are its comm time
    torch_tp: bool = False


def _train_step(forward, optimizer):
    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        _, loss = forward(x, y)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def _build(key, dense, groups, mesh, *, sabotage=None) -> _Runner:
    from . import bench_torch_tp as btp
    from .layers import ColumnParallelLinear
    from .overlap import overlapped_forward
    from .tp_model import TPGPT
    from .tp_vocab import VocabParallelTPGPT
    if key.startswith("dense"):
        return _Runner(dense, _train_step(dense, _optimizer(dense)), lambda t: t)
    if key.startswith("torch"):
        model = btp.torch_tp_model(dense, mesh, vocab_parallel=key == "torch_vocab")
        opt = _optimizer(model)
        return _Runner(lambda x, y: btp.forward_loss(model, x, y), lambda x, y: btp.train_step(model, opt, x, y),
                       btp.full_logits, torch_tp=True)
    group = groups["shm" if key.endswith("_shm") else "gloo"]
    model = (TPGPT if key.startswith("ours_rep") else VocabParallelTPGPT).from_dense(dense, group=group)
    if sabotage == key:  # deliberately wrong: c_attn cut into contiguous rows instead of per q/k/v section
        for block, dense_block in zip(model.transformer.h, dense.transformer.h):
            block.attn.c_attn = ColumnParallelLinear.from_dense(dense_block.attn.c_attn, group=group, stride=1)
    forward = train_forward = model
    if key == "ours_overlap":  # see OVERLAP_CHUNKS
        forward = partial(overlapped_forward, model, chunks=OVERLAP_CHUNKS[0])
        train_forward = partial(overlapped_forward, model, chunks=OVERLAP_CHUNKS[1])
    return _Runner(forward, _train_step(train_forward, _optimizer(model)), getattr(model, "gather_logits", lambda t: t),
                   group)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_comm_seconds(prof):
    return sum(e.cpu_time_total for e in prof.events()
               if e.name.startswith("_c10d_functional::") and "wrap_tensor" not in e.name) / 1e6


def _bench_size(size, groups, mesh, repeats, seed, variants, sabotage, device, threads):
    """One model size on this rank: build, guard, then interleaved timed rounds; returns the raw timings."""
    from torch.profiler import ProfilerActivity, profile
    rank, p = groups["gloo"].rank, groups["gloo"].world_size
    dense = dense_model(size.config, seed, device)
    x, y = _batch(size, seed, device)
    keys = [k for k in variants if rank == 0 or not k.startswith("dense")]  # dense ones run on rank 0 only
    runners = {k: _build(k, dense, groups, mesh, sabotage=sabotage) for k in keys if k != "dense1"}
    if "dense1" in keys:
        runners["dense1"] = runners["dense"]  # the same model and optimizer, on 1 thread
    raw = {k: {m: [] for m in ("fwd", "step", "comm_fwd", "comm_step", "calls_fwd", "calls_step")} for k in variants}

    def measure(key, phase, *, record=True, profiled=False):
        """Run `key`'s forward or step once with all ranks starting together; return its result."""
        dist.barrier()  # the ranks that sit out a dense run wait here, idle
        if key not in runners:
            return None
        r = runners[key]
        n0 = len(r.group.durations) if r.group else 0
        torch.set_num_threads({"dense": threads * p, "dense1": 1}.get(key, threads))
        with torch.no_grad() if phase == "fwd" else torch.enable_grad():
            with profile(activities=[ProfilerActivity.CPU]) if profiled else nullcontext() as prof:
                start = time.perf_counter()
                out = (r.forward if phase == "fwd" else r.step)(x, y)
                _sync(device)
                seconds = time.perf_counter() - start
        torch.set_num_threads(threads)
        calls = r.group.durations[n0:] if r.group else []
        if profiled:
            raw[key]["comm_" + phase].append(_torch_comm_seconds(prof))
        if record:
            raw[key][phase].append(seconds)
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
    dist.broadcast(ref, 0)
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
    del runners, dense
    return raw


def _worker(group, sizes, repeats, seed, variants, sabotage):
    """Every rank: the whole benchmark; returns {size name: {variant: {measure: [per run]}}, "_info": ...}."""
    from torch.distributed.device_mesh import init_device_mesh
    device, threads = group.device, torch.get_num_threads()
    groups = dict(gloo=TimedGroup())
    if any(k.endswith("_shm") for k in variants):
        groups["shm"] = TimedShmGroup(timeout=600.0)
    mesh = init_device_mesh(device.type, (group.world_size,))
    out = {s.name: _bench_size(s, groups, mesh, repeats, seed, variants, sabotage, device, threads) for s in sizes}
    out["_info"] = dict(backend=group.backend, threads=threads)
    return out


# ------------------------------------------------------------------------------ the parent's side

@dataclass
class BenchResult:
    sizes: list
    rows: list  # dicts: size, variant, key, fwd, step, comm_fwd, comm_step (ms), the ratios, the comm split
    table: str
    wall_s: float


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def run_bench(sizes=("tiny", "mid", "gpt2"), repeats: int = 3, *, seed: int = 0, p: int = 2,
              variants=DEFAULT_VARIANTS, backend: str | None = None, timeout: float = 1800.0,
              omp_wait_policy: str | None = "PASSIVE", _sabotage: str | None = None) -> BenchResult:
    """Run the benchmark on p processes; return its rows and the table (see the module docstring).

    sizes: names in SIZES or BenchSize objects; each gets repeats * size.rounds timed rounds.
    variants: keys of VARIANTS ("dense" always runs). omp_wait_policy: OMP_WAIT_POLICY for the
    ranks (None: inherit). PASSIVE lets the dense model's OpenMP threads sleep at a barrier instead
    of spinning: on a busy machine a spinning thread starves the one it waits for, and the dense
    model on 2 threads ran 2 to 5 times slower than on 1 (measured); on an idle machine it costs a
    little. Our ranks run 1 thread each, which no policy affects. `_sabotage` (a variant key)
    mis-shards that variant on purpose, to show that the guard stops it.
    """
    from .launch import default_backend, run_processes
    sizes = [SIZES[s] if isinstance(s, str) else s for s in sizes]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}: choose from {list(VARIANTS)}")
    backend = backend or default_backend(p)
    variants = ["dense"] + [k for k in VARIANTS if k in variants and k != "dense"
                            and not (k.endswith("_shm") and backend != "gloo")]  # shm: CPU tensors only
    load_before, start = _loadavg(), time.perf_counter()
    saved = os.environ.get("OMP_WAIT_POLICY")
    if omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = omp_wait_policy  # the ranks inherit the environment
    try:
        per_rank = run_processes(_worker, p, sizes, repeats, seed, variants, _sabotage, backend=backend,
                                 timeout=timeout, collective_timeout=timeout, echo=False)
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved
    rows = [row for s in sizes for row in bench_report.rows(s, [r[s.name] for r in per_rank], VARIANTS)]
    wall_s, info = time.perf_counter() - start, per_rank[0]["_info"]
    rounds = ", ".join(f"{s.name} {repeats * s.rounds}" for s in sizes)
    note = (f"\np={p} ranks ({info['backend']}, {info['threads']} thread(s) each) against the dense model on "
            f"{info['threads'] * p} thread(s); OMP_WAIT_POLICY={omp_wait_policy or 'inherited'}; timed rounds: "
            f"{rounds}; load average {load_before} before, {_loadavg()} after; wall time {wall_s:.0f} s")
    return BenchResult(sizes, rows, bench_report.format_table(rows, sizes, note), wall_s)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid", "gpt2"], choices=list(SIZES),
                        help="model sizes (default: all three)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds (times 5 for tiny, 2 for mid); the median is shown")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        help="variants to run (dense always runs; dense1 is off by default)")
    parser.add_argument("--p", type=int, default=2, help="tensor-parallel degree: processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: nccl if there are p GPUs)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of the ranks; '' inherits")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with arguments parsed by a parser that `add_arguments` filled; print the table."""
    result = run_bench(args.sizes, args.repeats, seed=args.seed, p=args.p, variants=args.variants,
                       backend=args.backend, omp_wait_policy=args.omp_wait_policy or None)
    print(result.table)
    return 0


def main(argv=None) -> int:
    """`python -m tputil.bench [options]`; a `bench` sub-command can call add_arguments(subparser) and run(args)."""
    parser = argparse.ArgumentParser(prog="python -m tputil.bench", description=__doc__.split("\n")[0])
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":  # run the package's copy of this module: the ranks unpickle its classes
    from tputil.bench import main as _main
    sys.exit(_main())
