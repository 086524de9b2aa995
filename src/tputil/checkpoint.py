"""GPT-2 checkpoints in the Hugging Face layout, read into the dense GPT or one rank's slice of it (chapter 16).

A Hugging Face GPT-2 directory holds `config.json` and `model.safetensors` (or the older
`pytorch_model.bin`). Its tensor names are ours (nanoGPT kept GPT-2's), with or without the
`transformer.` prefix; its four block matrices (c_attn, attn.c_proj, c_fc, mlp.c_proj) are
`Conv1D` weights, stored (in, out), the transpose of `nn.Linear`'s (out, in); the head is tied
to wte; the MLP's GELU is the tanh approximation (`activation_function: "gelu_new"`).

Each rank of the tensor-parallel model reads only its own slices: `shard.placement` says how a
tensor is split, `shard.shard_intervals` which ranges along that dim are this rank's, and
safetensors' `safe_open(...).get_slice(name)[...]` reads those ranges from the file and nothing
else, so no rank holds the whole model. A `pytorch_model.bin` is a pickle: torch.load unpickles
the whole index, and with mmap=True maps the file rather than reading it, so slicing a tensor
copies only the pages that hold the slice; a legacy (non-zip) .bin cannot be mapped and is read
whole by every rank.

`Source` is what both this module and `tp_checkpoint` (the TP model's own sharded files) read
through: `read(name, dim, lo, hi)` gives rows [lo, hi) along `dim` of the dense tensor, in our
layout; `read_shard` turns the plan's placement into those calls.
"""

import json
from pathlib import Path

import torch

from .layers import materialize
from .model import GPT, GPTConfig
from .shard import GPT_TP_PLAN, Replicate, Shard, VocabShard, dense_shapes, pad_vocab_size, placement, shard_intervals
from .tp_model import TPGPT

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)
GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # Hugging Face's name -> GPTConfig.gelu


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what to change."""


class Source:
    """Dense tensors in our layout, read a range at a time: `read(name, dim, lo, hi)` (a new tensor)."""

    shapes: dict  # name -> torch.Size in our layout

    def read(self, name: str, dim: int, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError


def read_shard(source: Source, name: str, rank: int, world_size: int, *, plan: dict = GPT_TP_PLAN) -> torch.Tensor:
    """Rank `rank`'s shard of tensor `name`, placed as `plan` says, reading only its ranges from `source`.

    Equal to `shard.local_shard(dense_tensor, placement(name, plan), rank, world_size)`, tested.
    """
    where, shape = placement(name, plan), source.shapes[name]
    if isinstance(where, Replicate):
        return source.read(name, 0, 0, shape[0])
    if isinstance(where, VocabShard):  # rows of the padded vocabulary; the padding is zeros, not in the file
        padded = pad_vocab_size(shape[0], world_size, multiple=where.multiple)
        ((lo, hi),) = shard_intervals(padded, rank, world_size, 1, what=f"{name}'s padded rows")
        rows = source.read(name, 0, lo, min(hi, shape[0])) if lo < shape[0] else source.read(name, 0, 0, 0)
        return torch.cat([rows, rows.new_zeros(hi - lo - rows.size(0), *shape[1:])])
    assert isinstance(where, Shard), where
    dim = where.dim % len(shape)
    ranges = shard_intervals(shape[dim], rank, world_size, where.stride, what=f"dim {dim} of {name}")
    return torch.cat([source.read(name, dim, lo, hi) for lo, hi in ranges], dim=dim)


def read_state(source: Source, rank: int, world_size: int, *, plan: dict = GPT_TP_PLAN) -> dict:
    """Rank `rank`'s shard state dict, read from `source` by the plan; the tied head read once, as wte."""
    state = {n: read_shard(source, n, rank, world_size, plan=plan) for n in source.shapes if n != "lm_head.weight"}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def dense_from_source(source: Source, config: GPTConfig, *, dtype=None) -> GPT:
    """The dense GPT (eval mode) holding every tensor of `source`, read whole."""
    with torch.device("meta"):
        model = GPT(config)  # shapes only: nothing drawn, nothing allocated
    state = read_state(source, 0, 1)  # p = 1: each tensor whole
    return materialize(model, state, device="cpu", dtype=dtype).eval()


# ------------------------------------------------------------------------ the Hugging Face layout


def config_from_hf(path) -> GPTConfig:
    """Our GPTConfig from a Hugging Face GPT-2 `config.json`; what our GPT cannot compute is refused."""
    path = Path(path)
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; a GPT-2 checkpoint directory holds config.json") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{path}: model_type {hf['model_type']!r}; only GPT-2 ('gpt2') is read")
    refused = {
        "activation_function": hf.get("activation_function", "gelu_new") not in GELUS,
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5) != 1e-5,
        "n_inner": hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)),
        "tie_word_embeddings": not hf.get("tie_word_embeddings", True),
        "scale_attn_weights": not hf.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": hf.get("add_cross_attention", False),
    }
    if any(refused.values()):
        bad = {k: hf.get(k) for k, no in refused.items() if no}
        raise CheckpointError(
            f"{path}: {bad}: our GPT computes GPT-2 as published (GELU {sorted(GELUS)}, layer_norm_epsilon 1e-5, "
            f"n_inner 4 n_embd, a tied head, attention scaled by 1/sqrt(hs)), so it cannot load this model"
        )
    try:
        return GPTConfig(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=0.0,  # inference: the checkpoint's *_pdrop are for training
            bias=True,
            gelu=GELUS[hf.get("activation_function", "gelu_new")],
        )
    except KeyError as exc:
        raise CheckpointError(f"{path}: no {exc.args[0]!r}; GPT-2's config.json has it") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


class HFSource(Source):
    """A Hugging Face GPT-2 weights file, read lazily, names and layout turned into ours.

    Shapes are checked against `config` when it is opened, before any tensor is read.
    """

    def __init__(self, path, config: GPTConfig):
        self.path = Path(path)
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            self._file = safe_open(str(self.path), framework="pt")
            stored = {k: torch.Size(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
            self._slice = self._file.get_slice
        else:  # a pickle: mmap=True maps the file; every tensor's metadata is unpickled, no data read
            try:
                tensors = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be mapped: read it whole
                tensors = torch.load(self.path, map_location="cpu", weights_only=True)
            stored = {k: t.shape for k, t in tensors.items()}
            self._slice = tensors.__getitem__
        self._names = {}  # our name -> the file's
        for key in stored:
            ours = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
            self._names[ours] = key
        self._names.setdefault("lm_head.weight", self._names.get("transformer.wte.weight"))  # tied: wte's rows
        expected = dense_shapes(config)
        missing = [n for n in expected if self._names.get(n) is None]
        if missing:
            raise CheckpointError(f"{self.path}: no tensor {missing[0]} ({len(missing)} of {len(expected)} missing)")
        self.shapes = {}
        for name, shape in expected.items():
            got = stored[self._names[name]]
            if name.endswith(CONV1D):
                got = torch.Size(reversed(got))
            if got != shape:
                raise CheckpointError(
                    f"{self.path}: {self._names[name]} has shape {tuple(stored[self._names[name]])}, the config "
                    f"({config}) needs {tuple(shape)}{' transposed (Conv1D)' if name.endswith(CONV1D) else ''}: "
                    f"is config.json from another model?"
                )
            self.shapes[name] = shape

    def read(self, name, dim, lo, hi):
        conv1d = name.endswith(CONV1D)
        stored_dim = 1 - dim if conv1d else dim
        index = tuple(slice(lo, hi) if d == stored_dim else slice(None) for d in range(len(self.shapes[name])))
        t = self._slice(self._names[name])[index]
        return (t.t() if conv1d else t).clone()  # Conv1D (in, out) -> Linear (out, in); a tensor of its own


def weights_file(directory) -> Path:
    """model.safetensors, else pytorch_model.bin, in `directory`; a CheckpointError naming both if neither."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"--checkpoint {directory}: no such directory")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: neither model.safetensors nor pytorch_model.bin is there")


def open_gpt2(directory) -> tuple:
    """(config, source) of a Hugging Face GPT-2 directory, checked; no tensor read yet."""
    directory = Path(directory)
    path = weights_file(directory)
    config = config_from_hf(directory / "config.json")
    return config, HFSource(path, config)


def load_gpt2(directory, *, group=None, dtype=None, **options):
    """GPT-2 from a Hugging Face directory: the dense `GPT` (group None), or this rank's `TPGPT`.

    A rank reads only its own slices (see the module docstring). options: TPGPT's (vocab_parallel,
    multiple, ...). Everything is checked (config, file, every shape, p dividing n_head) before
    any tensor is read, so a bad checkpoint raises a `CheckpointError` and loads nothing.
    """
    config, source = open_gpt2(directory)
    if group is None:
        return dense_from_source(source, config, dtype=dtype)
    return tp_from_source(source, config, group=group, dtype=dtype, **options)


def tp_from_source(source: Source, config, *, group, dtype=None, **options) -> TPGPT:
    """This rank's `TPGPT` (options: TPGPT's) from any `Source`, reading only its own slices.

    The model is first built on the meta device (nothing drawn), which checks that p divides
    n_head before a tensor is read, and gives the plan that names the slices.
    """
    with torch.device("meta"):
        model = TPGPT(config, group=group, **options)
    state = read_state(source, group.rank, group.world_size, plan=model.plan)
    return TPGPT.from_shard_state_dict(state, config, group=group, dtype=dtype, **options).eval()


def tokenizer(directory):
    """(encode, decode) for a checkpoint directory: GPT-2's byte-level BPE from vocab.json and
    merges.txt when both are there (read by `tokenizers`, offline), else None."""
    directory = Path(directory)
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return None
    from tokenizers import ByteLevelBPETokenizer  # optional: only for directories that hold a BPE

    bpe = ByteLevelBPETokenizer(str(vocab), str(merges))
    return (lambda text: bpe.encode(text).ids), (lambda ids: bpe.decode(list(ids)))
