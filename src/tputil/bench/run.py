"""The benchmark: the dense GPT against ours on p = 2 processes against PyTorch's tensor parallelism.

Measured in chapter 8 (real processes) and discussed there. Run it as `python -m tputil.bench`
(or the `bench` sub-command of `python -m tputil`): a command, not a test; it prints one table.

One run starts p real processes (`launch.run_processes`, gloo on CPU), each with its share of the
cores as torch intra-op threads (1 each on a 2-core machine). Every rank builds the same dense GPT
from a fixed seed (biases and norms perturbed so that a misplaced one shows), and from it:

- `ours, replicated head`: `tp_model.TPGPT.from_dense`;
- `ours, vocab head`: `tp_model.VocabParallelTPGPT.from_dense` (the logits stay sharded);
- `ours, vocab head + backward overlap`: the same model with `async_grad_all_reduce=True`: every
  column-parallel layer's backward starts the all-reduce of dL/dX asynchronously and computes
  dL/dW while it travels (Megatron-LM's asynchronous tensor-parallel all-reduce). Its forward
  is the plain one, so only the training step can differ;
- `ours, ... , shm` (replicated or vocab head): the same models on a `comm.ShmGroup`, whose
  all-reduces go through shared memory instead of gloo's sockets (same results, bit for bit at p = 2);
- `torch TP, replicated head` and `torch TP, vocab + loss_parallel`: `parallelize_module` on the
  same dense model (`torch_tp`); the latter is PyTorch's best plan for this model. With
  `, shm`: the same, its all-reduces through shared memory too (`torch_tp.shm_mesh`), so
  that ours on shared memory is compared with PyTorch's on shared memory.

The dense model runs on rank 0 alone with all p ranks' threads while the others wait in a barrier
(idle: a gloo barrier blocks without spinning). Measurements are interleaved: in every round each
variant's forward runs once, then each variant's training step, so the rest of the machine's noise
hits them all alike. Forward: `model(idx, targets)` under no_grad (logits and loss). Step:
zero_grad, forward, backward, AdamW (the same for all). Times and the time inside
collectives are summarized by `report` (the slowest rank, the median over the rounds).

What every rank does (the guard, the interleaved rounds, the timing of collectives) is in
`ranks`; the table is `report`'s.
"""

import argparse
import json
import os
import time
from dataclasses import dataclass

from ..model import GPTConfig
from . import report as bench_report
from .ranks import worker


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
    "ours_overlap": ("ours, vocab head + backward overlap", "torch_vocab"),
    "ours_rep_shm": ("ours, replicated head, shm", "torch_rep_shm"),
    "ours_vocab_shm": ("ours, vocab head, shm", "torch_vocab_shm"),
    "torch_rep": ("torch TP, replicated head", None),
    "torch_vocab": ("torch TP, vocab + loss_parallel", None),
    "torch_rep_shm": ("torch TP, replicated head, shm", None),
    "torch_vocab_shm": ("torch TP, vocab + loss_parallel, shm", None),
}
# not run by default: dense1, and the replicated head on shared memory (with every variant's model and
# AdamW state in memory at once, the GPT-2 shape needed over 12 GB per rank; measured: mid 0.97x/0.90x dense)
DEFAULT_VARIANTS = tuple(k for k in VARIANTS if k not in ("dense1", "ours_rep_shm", "torch_rep_shm"))


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


def run_bench(
    sizes=("tiny", "mid", "gpt2"),
    repeats: int = 3,
    *,
    seed: int = 0,
    p: int = 2,
    variants=DEFAULT_VARIANTS,
    backend: str | None = None,
    timeout: float = 1800.0,
    omp_wait_policy: str | None = "PASSIVE",
    _sabotage: str | None = None,
) -> BenchResult:
    """Run the benchmark on p processes; return its rows and the table (see the module docstring).

    sizes: names in SIZES or BenchSize objects; each gets repeats * size.rounds timed rounds.
    variants: keys of VARIANTS ("dense" always runs). omp_wait_policy: OMP_WAIT_POLICY for the
    ranks (None: inherit). PASSIVE lets the dense model's OpenMP threads sleep at a barrier instead
    of spinning: on a busy machine a spinning thread starves the one it waits for, and the dense
    model on 2 threads ran 2 to 5 times slower than on 1 (measured); on an idle machine it costs a
    little. Our ranks run 1 thread each, which no policy affects. `_sabotage` (a variant key)
    mis-shards that variant on purpose, to show that the guard stops it.
    """
    from ..launch import default_backend, run_processes

    sizes = [SIZES[s] if isinstance(s, str) else s for s in sizes]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}: choose from {list(VARIANTS)}")
    backend = backend or default_backend(p)
    variants = ["dense"] + [
        k for k in VARIANTS if k in variants and k != "dense" and not (k.endswith("_shm") and backend != "gloo")
    ]  # shm: CPU tensors only
    load_before, start = _loadavg(), time.perf_counter()
    saved = os.environ.get("OMP_WAIT_POLICY")
    if omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = omp_wait_policy  # the ranks inherit the environment
    try:
        per_rank = run_processes(
            worker,
            p,
            sizes,
            repeats,
            seed,
            variants,
            _sabotage,
            backend=backend,
            timeout=timeout,
            collective_timeout=timeout,
            echo=False,
        )
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved
    rows = [row for s in sizes for row in bench_report.rows(s, [r[s.name] for r in per_rank], VARIANTS)]
    wall_s, info = time.perf_counter() - start, per_rank[0]["_info"]
    rounds = ", ".join(f"{s.name} {repeats * s.rounds}" for s in sizes)
    note = (
        f"\np={p} ranks ({info['backend']}, {info['threads']} thread(s) each) against the dense model on "
        f"{info['threads'] * p} thread(s); OMP_WAIT_POLICY={omp_wait_policy or 'inherited'}; timed rounds: "
        f"{rounds}; load average {load_before} before, {_loadavg()} after; wall time {wall_s:.0f} s"
    )
    return BenchResult(sizes, rows, bench_report.format_table(rows, sizes, note), wall_s)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["tiny", "mid", "gpt2"],
        choices=list(SIZES),
        help="model sizes (default: all three)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed rounds (times 5 for tiny, 2 for mid); the median is shown"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=list(VARIANTS),
        help="variants to run (dense always runs; dense1 is off by default)",
    )
    parser.add_argument("--p", type=int, default=2, help="tensor-parallel degree: processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: nccl if there are p GPUs)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of the ranks; '' inherits")
    parser.add_argument(
        "--json", default=None, metavar="PATH", help="also write the rows and the table to PATH as JSON"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with arguments parsed by a parser that `add_arguments` filled; print the table."""
    result = run_bench(
        args.sizes,
        args.repeats,
        seed=args.seed,
        p=args.p,
        variants=args.variants,
        backend=args.backend,
        omp_wait_policy=args.omp_wait_policy or None,
    )
    print(result.table)
    if getattr(args, "json", None):
        record = dict(sizes=[s.name for s in result.sizes], rows=result.rows, table=result.table, wall_s=result.wall_s)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return 0


def main(argv=None, prog="python -m tputil.bench") -> int:
    """`python -m tputil.bench [options]` (and `python -m tputil bench [options]`): run and print the table."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    return run(add_arguments(parser).parse_args(argv))
