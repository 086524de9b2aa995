"""The command line's flags and their checks (chapters 8 and 9); the checkpoint flags are `cli_checkpoint`'s.

`build_parser` defines the commands train, generate and bench and their options (`cli.main` runs
them); `check_arguments` turns the parsed flags into the GPTConfig for p processes, or raises a
ValueError naming the flag to change, which `cli.setup` runs on every rank before any
communication.
"""

import argparse

import torch

from . import cli_checkpoint, train as tr
from .model import GPTConfig
from .shard import valid_degrees

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
    cli_checkpoint.add_arguments(p_train, p_gen)  # --save, --checkpoint, --load (chapter 16)

    # bench's own options are parsed by tputil.bench.run, imported only when this command runs
    commands.add_parser(
        "bench",
        add_help=False,
        help="time dense, ours and PyTorch's TP side by side (`python -m tputil bench --help` for its options)",
    )
    return parser


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
