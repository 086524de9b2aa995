"""The tensor-parallel model's own checkpoints: one file per rank, plus the plan and the config (chapter 16).

`save(model, directory)` writes `rank-R-of-P.safetensors` for every rank R (its shard state dict,
as it holds it; the tied head is stored once, as wte) and then, from rank 0 once every rank has
written, `tputil.json`: the config, P, the head's options and the plan as data. A directory
without `tputil.json` is an unfinished save and is refused.

`load(directory, group=g)` builds this rank's `TPGPT` at any p that divides n_head. At the
saving P each rank reads its own file. At another p it reshards: a new rank's range along a
split dim (`shard.shard_intervals` at p) is cut at the old ranks' boundaries and each piece read
from the old rank's file with `get_slice`, so each rank still reads only what it keeps. The
weights are the saving run's, bit for bit; the logits at another p differ only by the order of
the sums (chapter 7), and equal in float64 within 1e-12, tested.
"""

import dataclasses
import json
from pathlib import Path

import torch

from .checkpoint import CheckpointError, Source, dense_from_source, tp_from_source
from .model import GPTConfig
from .shard import (
    Replicate,
    Shard,
    VocabShard,
    check_shard_state_dict,
    dense_shapes,
    pad_vocab_size,
    placement,
)
from .tp_model import TPGPT

INDEX = "tputil.json"
FORMAT = "tputil tensor-parallel checkpoint, version 1"
PLACEMENTS = {"Shard": Shard, "Replicate": Replicate, "VocabShard": VocabShard}


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank}-of-{world_size}.safetensors"


def plan_to_json(plan: dict) -> dict:
    return {pattern: {"type": type(w).__name__, **dataclasses.asdict(w)} for pattern, w in plan.items()}


def plan_from_json(data: dict) -> dict:
    return {
        pattern: PLACEMENTS[w["type"]](**{k: v for k, v in w.items() if k != "type"}) for pattern, w in data.items()
    }


def save(model: TPGPT, directory) -> Path:
    """Write this rank's shard, and (rank 0, after every rank wrote) the index. Every rank must call it."""
    from safetensors.torch import save_file

    directory, group = Path(directory), model.group
    directory.mkdir(parents=True, exist_ok=True)
    if group.rank == 0:
        (directory / INDEX).unlink(missing_ok=True)  # until every shard is written, the directory is no checkpoint
    group.all_reduce(torch.zeros(1), tag="checkpoint.barrier")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(directory / rank_file(group.rank, group.world_size)))
    group.all_reduce(torch.zeros(1), tag="checkpoint.barrier")  # every rank has written its file
    if group.rank == 0:
        index = {
            "format": FORMAT,
            "world_size": group.world_size,
            "config": dataclasses.asdict(model.config),
            "vocab_parallel": model.vocab_parallel,
            "multiple": model.multiple,
            "plan": plan_to_json(model.plan),
            "files": [rank_file(r, group.world_size) for r in range(group.world_size)],
        }
        (directory / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return directory


class ShardedSource(Source):
    """The dense tensors of a saved TP checkpoint, read through the old ranks' files."""

    def __init__(self, directory, index: dict, config: GPTConfig):
        from safetensors import safe_open

        self.directory, self.config = Path(directory), config
        self.p, self.plan = index["world_size"], plan_from_json(index["plan"])
        self.files = []
        for r, name in enumerate(index["files"]):
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing; the checkpoint was saved by {self.p} ranks, one file each")
            f = safe_open(str(path), framework="pt")
            stored = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
            stored["lm_head.weight"] = stored.get("transformer.wte.weight")  # tied: stored once
            try:
                shapes = {k: torch.empty(s, device="meta") for k, s in stored.items() if s is not None}
                check_shard_state_dict(shapes, config, self.p, rank=r, plan=self.plan)
            except ValueError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
            self.files.append(f)
        self.shapes = {k: torch.Size(s) for k, s in dense_shapes(config).items()}

    def _piece(self, rank, name, dim, lo, hi):
        name = "transformer.wte.weight" if name == "lm_head.weight" else name
        index = tuple(slice(lo, hi) if d == dim else slice(None) for d in range(len(self.shapes[name])))
        return self.files[rank].get_slice(name)[index]

    def read(self, name, dim, lo, hi):
        where = placement(name, self.plan)
        if isinstance(where, Replicate):
            return self._piece(0, name, dim, lo, hi).clone()
        split = 0 if isinstance(where, VocabShard) else where.dim % len(self.shapes[name])
        if dim != split:
            raise ValueError(f"{name} is split along dim {split} in {self.directory}: read ranges along that dim")
        size = self.shapes[name][dim]
        if isinstance(where, VocabShard):  # old ranks hold chunks of the padded rows
            stride, chunk = 1, pad_vocab_size(size, self.p, multiple=where.multiple) // self.p
        else:
            stride, chunk = where.stride, size // (where.stride * self.p)
        section = size // stride  # q, k or v
        pieces, at = [], lo
        while at < hi:  # cut at the sections' and the old ranks' boundaries
            s = at // section
            q = (at - s * section) // chunk  # the old rank holding position `at`
            end = min(hi, s * section + (q + 1) * chunk)
            offset = s * chunk + (at - s * section - q * chunk)  # where it sits in that rank's file
            pieces.append(self._piece(q, name, dim, offset, offset + end - at))
            at = end
        return torch.cat(pieces, dim=dim) if pieces else self._piece(0, name, dim, 0, 0)


def read_index(directory) -> dict:
    path = Path(directory) / INDEX
    if not Path(directory).is_dir():
        raise CheckpointError(f"--load {directory}: no such directory")
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; `python -m tputil train --save DIR` writes it after every rank's file (an unfinished "
            f"save has none)"
        )
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def open_checkpoint(directory):
    """(index, config, source) of a saved checkpoint: the index read, every file and shape checked
    (`ShardedSource`), no tensor read; a `CheckpointError` naming the file otherwise."""
    index = read_index(directory)
    config = GPTConfig(**index["config"])
    return index, config, ShardedSource(directory, index, config)


def load_dense(directory, *, dtype=None):
    """The dense GPT with the saved weights (each tensor gathered from the ranks' files): the reference."""
    _, config, source = open_checkpoint(directory)
    return dense_from_source(source, config, dtype=dtype)


def load(directory, *, group, dtype=None, **options) -> TPGPT:
    """This rank's TPGPT from a saved checkpoint, at group.world_size (any p dividing n_head).

    options: TPGPT's; by default the saving run's head (vocab_parallel, multiple). Everything is
    checked (index, every file, every shape, p) before a tensor is read; errors name the file.
    """
    index, config, source = open_checkpoint(directory)
    options = {"vocab_parallel": index["vocab_parallel"], "multiple": index["multiple"], **options}
    return tp_from_source(source, config, group=group, dtype=dtype, **options)
