"""The command line: train, generate or bench the tensor-parallel GPT, checked against the dense one.

Chapter 8 (real processes) and chapter 9 (training) run it. One process, or p under torchrun:

    python -m tputil train --steps 50                                   # p = 1
    torchrun --standalone --nproc-per-node 2 -m tputil train --steps 50 # p = 2, gloo on CPU
    torchrun --standalone --nproc-per-node 2 -m tputil generate --prompt "The rank "
    python -m tputil bench --sizes tiny mid gpt2                        # starts its own p processes

Under torchrun each process reads RANK, WORLD_SIZE and LOCAL_RANK from the environment, joins the
process group (gloo on CPU, NCCL with one GPU per process) and builds its slice of the same seeded
dense GPT (`TPGPT.from_dense`); only rank 0 prints, and rank 0 also runs the dense model on the
same batches, as the reference. `generate` caches each rank's keys and values (chapter 13;
`--no-kv-cache` recomputes the context for every token) and compares its tokens with the dense
model's, generated without a cache. The flags and their checks are `cli_args`'s,
what the commands print, the comparisons included, `cli_report`'s, and the checkpoint options
(chapter 16) `cli_checkpoint`'s.

Exit codes: 2 for bad input (a degree that does not divide the heads, ...), found by every rank
before any communication, rank 0 saying what to change (torchrun itself then exits with 1).
1 when `train`'s TP loss leaves the dense loss by more than `train.loss_tolerance`, or when
`generate --steps 0` (the same weights) continues the prompt differently from the dense model
beyond a near-tie. After training, a different continuation is reported with exit code 0:
training amplifies rounding (at p = 1 too: the row-parallel bias is added in an op of its own),
and a near-tie can then go either way.
"""

import contextlib
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from . import cli_checkpoint, cli_report as report, rng, train as tr
from .cli_args import DTYPES, build_parser, check_arguments
from .comm import DistGroup, ShmGroup, SingleGroup
from .launch import available_cpus, default_backend, environment, select_device
from .model import GPT
from .tp_model import TPGPT, VocabParallelTPGPT

# ---------------------------------------------------------------------------------- set-up


class Context:
    """Who this process is (rank, p, device), its group, and a print that only rank 0 uses."""

    def __init__(self, rank, world_size, group, device, backend):
        self.rank, self.world_size, self.group, self.device, self.backend = rank, world_size, group, device, backend

    def say(self, *args, **kwargs):
        if self.rank == 0:
            print(*args, **kwargs, flush=True)


def _usage_error(parser, rank, message, *, every_rank=True):
    """Exit with code 2. An error that every rank finds (bad flags) is printed by rank 0 only; the
    others wait a moment first, because torchrun stops every process as soon as one exits with an
    error, and rank 0 must have printed by then. One that only some ranks find, each prints."""
    if rank == 0:
        parser.error(message)
    if every_rank:
        time.sleep(2.0)
        sys.exit(2)
    parser.exit(2, f"{parser.prog}: error on rank {rank}: {message}\n")


def setup(args, parser):
    """Check the arguments (on every rank, before any communication), then join the process group."""
    env = environment()
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    try:
        config = check_arguments(args, world_size)
    except ValueError as exc:
        _usage_error(parser, rank, str(exc))
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it to 1 for p > 1; others may not
        torch.set_num_threads(max(1, available_cpus() // env.local_world_size))  # the processes share the cores
    backend = args.backend or default_backend(env.local_world_size)  # nccl if each process has a GPU
    if args.shm and backend != "gloo":
        _usage_error(
            parser,
            rank,
            f"--shm joins CPU processes, but the backend is {backend} (GPUs): drop --shm, or add --backend gloo",
        )
    if backend == "nccl" and local_rank >= torch.cuda.device_count():
        _usage_error(
            parser,
            rank,
            f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
            f"use fewer processes per node, or --backend gloo",
            every_rank=False,
        )
    device = select_device(backend, local_rank)
    if env.launched:
        dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
        group = ShmGroup(timeout=args.timeout) if args.shm else DistGroup()
        backend += ", all-reduces through shared memory" if args.shm else ""
    else:
        backend, group = "none (one process)", SingleGroup(device)
    return config, Context(rank, world_size, group, device, backend)


def build_models(config, args, ctx):
    """The dense GPT, the same on every rank (seeded), and this rank's slice of it."""
    torch.manual_seed(args.seed)
    dense = GPT(config).to(device=ctx.device, dtype=DTYPES[args.dtype])
    tp = VocabParallelTPGPT if args.vocab_parallel else TPGPT
    sequence_parallel = getattr(args, "sequence_parallel", False)  # train's --sequence-parallel
    return dense, tp.from_dense(dense, group=ctx.group, rng_seed=args.seed, sequence_parallel=sequence_parallel)


# ------------------------------------------------------------------------------- commands


def cmd_train(args, config, ctx) -> int:
    dense, model = build_models(config, args, ctx)
    run = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    report.describe(config, args, ctx, dense)
    ctx.say(
        f"data: generated corpus ({len(tr.corpus())} bytes), batches of {args.batch_size} x {config.block_size} "
        f"tokens (seed {args.seed}); AdamW lr={args.lr}"
    )
    dropout = config.dropout > 0  # the reference then needs the ranks' masks: TP first, the dense model after
    if dropout:
        ctx.say(
            f"dropout {config.dropout}: the TP model trains first; the dense reference then replays the masks "
            f"the ranks drew (chapter 12), gathered to rank 0"
        )
    dense_losses = tr.train(dense, args.steps, **run) if ctx.rank == 0 and not dropout else None  # the reference
    table, comm, start = report.LossTable(ctx, args.dtype), [], time.perf_counter()

    def on_step(step, loss, stats):
        comm.append(stats)
        if ctx.rank == 0 and not dropout:
            table.row(step, loss, dense_losses[step])

    with rng.recording(model) if dropout else contextlib.nullcontext() as masks:
        losses = tr.train(model, args.steps, **run, on_step=on_step)
    seconds = (time.perf_counter() - start) / args.steps
    if dropout:  # chapter 12: the dense model with the masks the ranks drew (one all-gather per site)
        rank_masks = rng.gather_rank_masks(masks, ctx.group)
        if ctx.rank == 0:
            regions = {name: site.region for name, site in rng.dropout_sites(model).items()}
            with rng.replaying(dense, rng.assemble_masks(rank_masks, regions, seq_len=config.block_size)):
                dense_losses = tr.train(dense, args.steps, **run)
            for step, loss in enumerate(losses):
                table.row(step, loss, dense_losses[step])
    if args.save:  # chapter 16: every rank writes its shard
        cli_checkpoint.save(model, args, ctx)
    if ctx.rank != 0:
        return 0
    return report.train_summary(args, config, ctx, losses, dense_losses, table.gaps, comm[-1], seconds)


def cmd_generate(args, config, ctx) -> int:
    if args.checkpoint or args.load:  # chapter 16
        return cli_checkpoint.cmd_generate(args, config, ctx)
    dense, model = build_models(config, args, ctx)
    report.describe(config, args, ctx, dense)
    if args.steps:
        run = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        ctx.say(f"training both models for {args.steps} steps on the generated corpus ...")
        if ctx.rank == 0:
            tr.train(dense, args.steps, **run)
        losses = tr.train(model, args.steps, **run)
        ctx.say(f"TP loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    idx = tr.encode(args.prompt)[None, :].to(ctx.device)  # (1, T)
    model.eval()
    start = time.perf_counter()
    out = model.generate(idx, args.new_tokens, kv_cache=args.kv_cache)[0, idx.size(1) :]  # each token communicates
    seconds = time.perf_counter() - start
    if ctx.rank != 0:
        return 0
    reference = dense.eval().generate(idx, args.new_tokens, kv_cache=False)[0, idx.size(1) :]  # nanoGPT's way
    how = "with a KV cache of each rank's heads" if args.kv_cache else "without a KV cache"
    first = report.compare_continuation(
        ctx, args, out, reference, seconds, unit="byte", decode=tr.decode, how=f", {how}", dense="dense without a cache"
    )
    return 0 if first is None else report.explain_difference(args, config, ctx, dense, idx, out, reference, first)


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            parser.error(
                "bench starts its own processes: run it once, as `python -m tputil bench --p N`, not under torchrun"
            )
        from .bench.run import main as bench_main  # the benchmark, and PyTorch's DTensor, only here

        return bench_main(rest, prog="python -m tputil bench")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    config, ctx = setup(args, parser)
    try:
        return {"train": cmd_train, "generate": cmd_generate}[args.command](args, config, ctx)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
