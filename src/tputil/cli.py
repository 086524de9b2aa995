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
model's, generated without a cache. What they print, the comparisons included, is `cli_report`'s;
the checkpoint options (chapter 16) are `cli_checkpoint`'s.

Exit codes: 2 for bad input (a degree that does not divide the heads, ...), found by every rank
before any communication, rank 0 saying what to change (torchrun itself then exits with 1).
1 when `train`'s TP loss leaves the dense loss by more than `train.loss_tolerance`, or when
`generate --steps 0` (the same weights) continues the prompt differently from the dense model
beyond a near-tie. After training, a different continuation is reported with exit code 0:
training amplifies rounding (at p = 1 too: the row-parallel bias is added in an op of its own),
and a near-tie can then go either way.
"""

import argparse
import contextlib
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from . import cli_checkpoint, cli_report as report, rng, train as tr
from .comm import DistGroup, ShmGroup, SingleGroup
from .launch import available_cpus, default_backend, environment, select_device
from .model import GPT, GPTConfig
from .shard import valid_degrees
from .tp_model import TPGPT, VocabParallelTPGPT

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _probability(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tputil",
        description="Megatron-style tensor parallelism on a nanoGPT-style GPT, checked against the dense model. "
        "Runs as one process (p = 1) or as p processes under "
        "`torchrun --standalone --nproc-per-node p -m tputil ...`.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,generate,bench}")
    common = argparse.ArgumentParser(add_help=False)
    model = common.add_argument_group("model (vocab_size 256: one token per byte)")
    model.add_argument("--n-layer", type=_positive_int, default=2, help="transformer blocks (default 2)")
    model.add_argument("--n-head", type=_positive_int, default=4, help="attention heads; p must divide it (default 4)")
    model.add_argument(
        "--n-embd", type=_positive_int, default=64, help="channels C; a multiple of --n-head (default 64)"
    )
    model.add_argument("--block-size", type=_positive_int, default=64, help="context length T (default 64)")
    run = common.add_argument_group("run")
    run.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per batch B (default 8)")
    run.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    run.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batches (default 0)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="(default float32)")
    run.add_argument(
        "--backend",
        choices=["gloo", "nccl"],
        default=None,
        help="torch.distributed backend under torchrun (default: nccl if every process can have its own "
        "GPU, else gloo)",
    )
    run.add_argument(
        "--vocab-parallel",
        action="store_true",
        help="shard the embedding, the tied head and the loss over the vocabulary (chapter 10) "
        "instead of replicating them",
    )
    run.add_argument(
        "--shm",
        action="store_true",
        help="all-reduce through shared memory instead of gloo's sockets (CPU processes on one machine; chapter 8)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a rank waits for the others (start-up, each collective) (default 60)",
    )

    p_train = commands.add_parser(
        "train",
        parents=[common],
        help="train the TP model, the dense loss side by side",
        description="Train the tensor-parallel GPT with AdamW on a generated corpus and "
        "print its loss next to the dense model's at every step.",
    )
    p_train.add_argument("--steps", type=_positive_int, default=50, help="training steps (default 50)")
    p_train.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="split the activations between the tensor-parallel regions along T (chapter 11): "
        "reduce-scatters and all-gathers instead of all-reduces; combinable with --vocab-parallel",
    )
    p_train.add_argument(
        "--dropout",
        type=_probability,
        default=0.0,
        help="dropout probability in [0, 1) (chapter 12): the dense reference is run with the masks the ranks "
        "drew (default 0)",
    )
    p_train.set_defaults(func=cmd_train)

    p_gen = commands.add_parser(
        "generate",
        parents=[common],
        help="greedy text from the TP model, vs the dense",
        description="Optionally train both models first, then continue a prompt greedily "
        "with the tensor-parallel GPT and compare with the dense GPT.",
    )
    p_gen.add_argument("--prompt", default="The rank ", help="text to continue (default 'The rank ')")
    p_gen.add_argument("--new-tokens", type=_positive_int, default=48, help="bytes to generate (default 48)")
    p_gen.add_argument(
        "--no-kv-cache",
        dest="kv_cache",
        action="store_false",
        help="recompute the whole context for every token instead of caching each rank's keys and values "
        "(chapter 13); the tokens are the same",
    )
    p_gen.add_argument(
        "--steps",
        type=_non_negative_int,
        default=None,
        help="training steps before generating; 0 for the untrained model (default 200; 0 with --checkpoint or --load)",
    )
    p_gen.set_defaults(func=cmd_generate)
    cli_checkpoint.add_arguments(p_train, p_gen)  # --save, --checkpoint, --load (chapter 16)

    # bench's own options are parsed by tputil.bench.run, imported only when this command runs
    commands.add_parser(
        "bench",
        add_help=False,
        help="time dense, ours and PyTorch's TP side by side (`python -m tputil bench --help` for its options)",
    )
    return parser


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


def check_arguments(args, world_size) -> GPTConfig:
    """The config for these arguments at degree world_size, or a ValueError saying what to change."""
    config = cli_checkpoint.checkpoint_config(args, world_size)  # --checkpoint or --load: the checkpoint's
    if config is not None:
        if args.backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("--backend nccl needs CUDA GPUs, and none is available: use --backend gloo")
        return config
    try:
        config = GPTConfig(
            block_size=args.block_size,
            vocab_size=256,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            dropout=getattr(args, "dropout", 0.0),  # train's --dropout
        )
    except ValueError as exc:
        raise ValueError(f"{exc} (flags --n-embd and --n-head)") from None
    if world_size not in valid_degrees(config):  # the package's rule: p divides n_head
        fits = valid_degrees(config, max_p=64)
        raise ValueError(
            f"--n-head {config.n_head} cannot be split over p={world_size} processes: the heads are "
            f"divided between the ranks, so p must divide the number of heads. Run with "
            f"--nproc-per-node in {fits}, or choose --n-head (and --n-embd) a multiple of {world_size}"
        )
    corpus_size = len(tr.corpus())
    if config.block_size >= corpus_size:
        raise ValueError(
            f"--block-size {config.block_size} is too long for the {corpus_size}-byte corpus: "
            f"use at most {corpus_size - 1}"
        )
    if args.backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--backend nccl needs CUDA GPUs, and none is available: use --backend gloo")
    if getattr(args, "prompt", None) == "":
        raise ValueError("--prompt is empty: give at least one character to continue")
    return config


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
        return args.func(args, config, ctx)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
