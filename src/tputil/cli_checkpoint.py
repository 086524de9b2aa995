"""The command line's checkpoint options (chapter 16): `train --save DIR`, `generate --checkpoint DIR`, `--load DIR`.

    torchrun --standalone --nproc-per-node 2 -m tputil train --steps 50 --save ckpt
    torchrun --standalone --nproc-per-node 4 -m tputil generate --load ckpt        # resharded from p = 2
    torchrun --standalone --nproc-per-node 4 -m tputil generate --checkpoint gpt2 --prompt "Hello"

`--checkpoint DIR`: GPT-2 in the Hugging Face layout (`checkpoint.load_gpt2`), each rank reading
its own slices; with `vocab.json` and `merges.txt` in DIR the prompt is GPT-2's byte-level BPE
(read by `tokenizers`), else the course's byte tokens. `--load DIR`: the TP model's own files
(`tp_checkpoint`). The model's shape comes from the checkpoint, not from the --n-* flags. Rank 0
also loads the dense model, whole, as the reference the TP continuation is compared with.
"""

import time
from pathlib import Path

import torch

from . import checkpoint as ck, cli_report as report, tp_checkpoint as tc, train as tr
from .shard import valid_degrees


def add_arguments(p_train, p_gen):
    p_train.add_argument(
        "--save",
        metavar="DIR",
        help="after training, write the TP model to DIR: one file per rank, the plan and the config (chapter 16)",
    )
    source = p_gen.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="GPT-2 in the Hugging Face layout (config.json, model.safetensors or pytorch_model.bin; with "
        "vocab.json and merges.txt, GPT-2's tokenizer); each rank reads only its slices (chapter 16)",
    )
    source.add_argument(
        "--load", metavar="DIR", help="a checkpoint written by `train --save`, at any p that divides its heads"
    )


def checkpoint_config(args, world_size):
    """The config of --checkpoint or --load, the files checked (no tensor read); a ValueError naming
    the file or the flag otherwise. None without those flags."""
    directory = getattr(args, "checkpoint", None) or getattr(args, "load", None)
    if directory is None:
        if getattr(args, "steps", 0) is None:
            args.steps = 200  # generate trains the course's model first, by default
        if getattr(args, "save", None) and Path(args.save).exists() and not Path(args.save).is_dir():
            raise ValueError(f"--save {args.save}: a file of that name exists; give a directory")
        return None
    flag = "--checkpoint" if args.checkpoint else "--load"
    if args.steps not in (None, 0):
        raise ValueError(f"--steps {args.steps} trains the course's model; {flag} generates with the checkpoint's")
    args.steps = 0
    if args.checkpoint:
        config, _ = ck.open_gpt2(args.checkpoint)  # reads config.json and the tensor table, checks every shape
        if ck.tokenizer(args.checkpoint) is None and config.vocab_size < 256:
            raise ValueError(
                f"{args.checkpoint} has no vocab.json and merges.txt, so the prompt is encoded as bytes, and its "
                f"vocabulary of {config.vocab_size} ids cannot hold the 256 byte values: add GPT-2's tokenizer files"
            )
    else:
        _, config, _ = tc.open_checkpoint(args.load)  # every file there, every shape right
    if world_size not in valid_degrees(config):
        raise ValueError(
            f"{flag} {directory}: n_head={config.n_head} cannot be split over p={world_size} processes: run with "
            f"--nproc-per-node in {valid_degrees(config, max_p=64)}"
        )
    return config


def _decode_bytes(ids) -> str:
    """The course's byte tokens back to text; ids past 255 (a larger vocabulary) as U+FFFD."""
    text, run = [], []
    for i in ids:
        if i < 256:
            run.append(i)
        else:
            text, run = text + [tr.decode(run), "\ufffd"], []
    return "".join(text + [tr.decode(run)])


def _codec(args):
    found = ck.tokenizer(args.checkpoint) if args.checkpoint else None
    if found is None:
        return tr.encode, _decode_bytes, "bytes"
    encode, decode = found
    return (lambda text: torch.tensor(encode(text), dtype=torch.long)), decode, "GPT-2's byte-level BPE"


def cmd_generate(args, config, ctx) -> int:
    dtype = getattr(torch, args.dtype)  # "float32" or "float64": the parser's --dtype choices (cli_args.DTYPES)
    options = {"vocab_parallel": True} if args.vocab_parallel else {}
    if args.checkpoint:
        model = ck.load_gpt2(args.checkpoint, group=ctx.group, dtype=dtype, **options)
        what = f"GPT-2 from {args.checkpoint} (Hugging Face layout), each rank reading its slices"
    else:
        model = tc.load(args.load, group=ctx.group, dtype=dtype, **options)
        saved = tc.read_index(args.load)["world_size"]
        what = f"the TP checkpoint {args.load} saved at p={saved}" + (" (resharded)" if saved != ctx.world_size else "")
    encode, decode, how = _codec(args)
    ctx.say(
        f"model: {what}; n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
        f"block_size={config.block_size} vocab_size={config.vocab_size} gelu={config.gelu!r}, {args.dtype}"
    )
    ctx.say(f"tensor parallel over p={ctx.world_size} process(es), backend {ctx.backend}; prompt tokens: {how}")
    idx = encode(args.prompt)[None, :].to(ctx.device)  # (1, T)
    start = time.perf_counter()
    out = model.generate(idx, args.new_tokens, kv_cache=args.kv_cache)[0, idx.size(1) :]
    seconds = time.perf_counter() - start
    if ctx.rank != 0:
        return 0
    if args.checkpoint:
        dense = ck.load_gpt2(args.checkpoint, dtype=dtype)
    else:
        dense = tc.load_dense(args.load, dtype=dtype)
    reference = dense.to(ctx.device).generate(idx, args.new_tokens, kv_cache=False)[0, idx.size(1) :]
    first = report.compare_continuation(
        ctx,
        args,
        out,
        reference,
        seconds,
        unit="token",
        decode=lambda ids: decode(ids.tolist()),
        dense="the same checkpoint, whole, on rank 0",
    )
    return 0 if first is None else 1


def save(model, args, ctx):
    tc.save(model, args.save)
    ctx.say(f"saved: {args.save}, {ctx.world_size} file(s) (one per rank), {tc.INDEX} (config and plan)")
