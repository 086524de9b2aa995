"""Splitting dense tensors into per-rank shards and gathering them back, by a plan.

Derived in chapter 3 (`divide`, `shard_tensor`, `gather_tensors`), chapter 5 (the `stride` for
nanoGPT's fused q/k/v weight), chapter 6 (the plan over the whole GPT's state dict), chapter 10
(`pad_vocab_size`, `vocab_range` and the `VocabShard` placement of `GPT_VOCAB_TP_PLAN`) and
chapter 16 (`shard_intervals`: the ranges a rank reads from a checkpoint file).

A shard of a tensor along `dim` is one of p equal contiguous chunks; with `stride` s the dim is
first cut into s equal sections (q, k and v for `c_attn`) and rank r takes chunk r of each
section. Gathering is the exact inverse: `gather_tensors(shards) == t`, bit for bit.
"""

import fnmatch
from dataclasses import dataclass

import torch


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending: the degrees p that split n evenly."""
    return [d for d in range(1, n + 1) if n % d == 0]


def divide(n: int, p: int, what: str = "n") -> int:
    """n // p, or a ValueError naming the numbers and the degrees that would work."""
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"p={p!r}: the parallel degree must be a positive integer")
    if n % p != 0:
        raise ValueError(f"{what}={n} is not divisible by p={p}; p must divide {what}: try one of {divisors(n)}")
    return n // p


def pad_vocab_size(vocab_size: int, p: int, *, multiple: int = 1) -> int:
    """The smallest multiple of `multiple * p` that is >= vocab_size: the vocabulary split over p ranks.

    multiple=1 pads at most p - 1 rows, none when p divides vocab_size (50257 at p = 2 -> 50258);
    multiple=128 is Megatron-LM's rule (50257 at p = 2 -> 50432). Padded ids are never predicted:
    the loss and the argmax mask their logits (`loss`). Chapter 10 compares the two.
    """
    for name, value in (("vocab_size", vocab_size), ("p", p), ("multiple", multiple)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"pad_vocab_size: {name}={value!r}: it must be a positive integer")
    step = multiple * p
    return -(-vocab_size // step) * step


def vocab_range(padded_vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The token ids [start, end) that rank `rank` owns: the rank-th of p equal contiguous ranges."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in range(world_size={world_size})")
    per_rank = divide(padded_vocab_size, world_size, "padded_vocab_size")
    return rank * per_rank, (rank + 1) * per_rank


def shard_intervals(size: int, rank: int, world_size: int, stride: int = 1, what: str | None = None) -> list:
    """The index ranges [lo, hi) along a dim of `size` that make rank `rank`'s shard, in order.

    stride=1: one range, chunk `rank` of p. stride=s: the dim holds s sections stacked (c_attn's q,
    k and v, see GPT_TP_PLAN), and chunk `rank` of each. What `shard_tensor` cuts out, and what a
    rank reads from a file without loading the rest (chapter 16).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in range(world_size={world_size})")
    if stride < 1 or size % (stride * world_size) != 0:
        raise ValueError(
            f"cannot shard {what or f'a dim of size {size}'} into p={world_size} shards with stride {stride}: "
            f"{size} is not divisible by stride * p = {stride * world_size}"
        )
    section, chunk = size // stride, size // (stride * world_size)  # e.g. q, k and v; each rank's part of one
    return [(s * section + rank * chunk, s * section + (rank + 1) * chunk) for s in range(stride)]


def shard_tensor(t: torch.Tensor, rank: int, world_size: int, dim: int, stride: int = 1) -> torch.Tensor:
    """Rank `rank`'s shard of t along dim (a new tensor): chunk `rank` of each of `stride` sections.

    stride=1: t.chunk(world_size, dim)[rank]. stride=s: dim holds s sections stacked (c_attn's q, k
    and v, see GPT_TP_PLAN) and rank r gets [section_1 chunk r; ...; section_s chunk r].
    """
    dim = dim % t.dim()
    what = f"dim {dim} (size {t.size(dim)}) of a tensor of shape {tuple(t.shape)}"
    ranges = shard_intervals(t.size(dim), rank, world_size, stride, what)
    return torch.cat([t.narrow(dim, lo, hi - lo) for lo, hi in ranges], dim=dim)


def gather_tensors(shards, dim: int, stride: int = 1) -> torch.Tensor:
    """The inverse of shard_tensor: shards (in rank order) -> the dense tensor. Differentiable."""
    shards = list(shards)
    if not shards:
        raise ValueError("gather_tensors: no shards given")
    shape, dtype = shards[0].shape, shards[0].dtype
    for r, s in enumerate(shards):
        if s.shape != shape or s.dtype != dtype:
            raise ValueError(
                f"gather_tensors: shard {r} has shape {tuple(s.shape)} and dtype {s.dtype}, "
                f"shard 0 has {tuple(shape)} and {dtype}; all shards must agree"
            )
    dim = dim % len(shape)
    if stride < 1 or shape[dim] % stride != 0:
        raise ValueError(
            f"gather_tensors: dim {dim} of the shards (size {shape[dim]}) is not divisible by stride={stride}"
        )
    pieces = [s.split(shape[dim] // stride, dim=dim) for s in shards]  # pieces[rank][section]
    return torch.cat([pieces[r][i] for i in range(stride) for r in range(len(shards))], dim=dim)


# ---------------------------------------------------------------------------- the plan, as data


@dataclass(frozen=True)
class Shard:
    """Split along `dim`, with `stride` sections (see shard_tensor)."""

    dim: int
    stride: int = 1


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole tensor."""


@dataclass(frozen=True)
class VocabShard:
    """Split dim 0 (the vocabulary) into p contiguous ranges, after padding it with zero rows.

    The padded size is `pad_vocab_size(V, p, multiple=multiple)`; gathering drops the padding
    again, so the dense tensor comes back bit for bit (chapter 10).
    """

    multiple: int = 1


# Parameter-name pattern (fnmatch: `*` matches a layer index) -> placement; the first match wins,
# and a parameter that matches nothing is an error. Comments name the communication each causes.
GPT_TP_PLAN = {
    "transformer.wte.weight": Replicate(),  # the whole vocabulary on every rank (chapter 10 shards it)
    "transformer.wpe.weight": Replicate(),
    "transformer.h.*.ln_[12].weight": Replicate(),  # every rank normalizes the full (B, T, C)
    "transformer.h.*.ln_[12].bias": Replicate(),
    # column-parallel; q, k and v stacked: each rank its heads' rows of each (the TP attention reads the stride here)
    "transformer.h.*.attn.c_attn.weight": Shard(0, stride=3),
    "transformer.h.*.attn.c_attn.bias": Shard(0, stride=3),
    "transformer.h.*.attn.c_proj.weight": Shard(1),  # row-parallel: its heads' features in; one all-reduce
    "transformer.h.*.attn.c_proj.bias": Replicate(),  # added once, after the all-reduce
    "transformer.h.*.mlp.c_fc.weight": Shard(0),  # column-parallel: 4C/p hidden features per rank
    "transformer.h.*.mlp.c_fc.bias": Shard(0),
    "transformer.h.*.mlp.c_proj.weight": Shard(1),  # row-parallel: one all-reduce
    "transformer.h.*.mlp.c_proj.bias": Replicate(),  # added once, after the all-reduce
    "transformer.ln_f.weight": Replicate(),
    "transformer.ln_f.bias": Replicate(),
    "lm_head.weight": Replicate(),  # tied to wte
}


def vocab_parallel_plan(multiple: int = 1) -> dict:
    """GPT_TP_PLAN with the tied wte/lm_head split over the vocabulary instead of replicated (chapter 10).

    Same patterns in the same order; only the two vocabulary tensors change placement.
    """
    return {
        **GPT_TP_PLAN,
        "transformer.wte.weight": VocabShard(multiple),  # each rank its ids' rows; one all-reduce of B*T*C
        "lm_head.weight": VocabShard(multiple),
    }  # the same tensor: column-parallel head, logits (B, T, V_pad/p)


GPT_VOCAB_TP_PLAN = vocab_parallel_plan()


def _pad_rows(t, rows: int):
    """t with zero rows appended along dim 0 up to `rows` rows (t itself when it has them already)."""
    if t.size(0) == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])], dim=0)


def placement(name: str, plan: dict = GPT_TP_PLAN):
    """The plan's entry for parameter `name` (the first matching pattern)."""
    for pattern, where in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return where
    raise KeyError(f"no entry in the plan matches parameter {name!r}; add a pattern for it")


def valid_degrees(config, max_p: int | None = None) -> list[int]:
    """The tensor-parallel degrees p this GPT config allows: the divisors of n_head (heads are split)."""
    return [p for p in divisors(config.n_head) if max_p is None or p <= max_p]


def _check_degree(config, world_size):
    divide(config.n_head, world_size, "n_head")


def local_shard(t: torch.Tensor, where, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s part of the dense tensor t placed `where` (Replicate, Shard or VocabShard): a new tensor."""
    t = t.detach()
    if isinstance(where, Replicate):
        return t.clone()
    if isinstance(where, VocabShard):
        t = _pad_rows(t, pad_vocab_size(t.size(0), world_size, multiple=where.multiple))
        return shard_tensor(t, rank, world_size, 0)
    return shard_tensor(t, rank, world_size, where.dim, where.stride)


def shard_state_dict(state_dict: dict, config, rank: int, world_size: int, *, plan: dict = GPT_TP_PLAN) -> dict:
    """Rank `rank`'s state dict: each tensor sharded or copied by the plan (same keys, new tensors)."""
    _check_degree(config, world_size)
    return {name: local_shard(t, placement(name, plan), rank, world_size) for name, t in state_dict.items()}


def dense_shapes(config) -> dict:
    """The dense GPT's state-dict shapes, in state-dict order, computed from the config alone."""
    C, V, bias = config.n_embd, config.vocab_size, config.bias
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (config.block_size, C)}
    for i in range(config.n_layer):
        for name, (n_out, n_in) in (
            ("ln_1", (C, None)),
            ("attn.c_attn", (3 * C, C)),
            ("attn.c_proj", (C, C)),
            ("ln_2", (C, None)),
            ("mlp.c_fc", (4 * C, C)),
            ("mlp.c_proj", (C, 4 * C)),
        ):
            shapes[f"transformer.h.{i}.{name}.weight"] = (n_out,) if n_in is None else (n_out, n_in)
            if bias:
                shapes[f"transformer.h.{i}.{name}.bias"] = (n_out,)
    shapes["transformer.ln_f.weight"] = (C,)
    if bias:
        shapes["transformer.ln_f.bias"] = (C,)
    shapes["lm_head.weight"] = (V, C)  # the same tensor as wte's
    return {name: torch.Size(shape) for name, shape in shapes.items()}


def shard_shapes(config, world_size: int, *, plan: dict = GPT_TP_PLAN) -> dict:
    """The shape every rank's shard of each parameter must have at degree world_size."""
    _check_degree(config, world_size)
    shapes = {}
    for name, shape in dense_shapes(config).items():
        where = placement(name, plan)
        shape = list(shape)
        if isinstance(where, VocabShard):
            shape[0] = pad_vocab_size(shape[0], world_size, multiple=where.multiple) // world_size
        if isinstance(where, Shard):
            shape[where.dim] //= world_size
        shapes[name] = torch.Size(shape)
    return shapes


def check_shard_state_dict(state_dict: dict, config, world_size: int, *, rank=None, plan: dict = GPT_TP_PLAN):
    """Raise a ValueError naming the parameter, expected and actual shape, if a shard does not fit."""
    who = "" if rank is None else f"rank {rank}: "
    expected = shard_shapes(config, world_size, plan=plan)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{who}shard state dict does not match the GPT: missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        actual = state_dict[name].shape
        if actual != shape:
            raise ValueError(
                f"{who}{name}: expected shape {tuple(shape)} for a shard at p={world_size}, "
                f"got {tuple(actual)} (was it sharded for another p, or another config?)"
            )


def gather_state_dict(shards: list, config, *, plan: dict = GPT_TP_PLAN, check_replicas: bool = True) -> dict:
    """The dense state dict from every rank's shard (in rank order): the inverse of shard_state_dict.

    p is len(shards). Shapes are checked first; with check_replicas, replicated tensors must be
    equal on every rank (they should be: a difference means the ranks drifted apart).
    """
    shards = list(shards)
    if not shards:
        raise ValueError("gather_state_dict: no shards given")
    p = len(shards)
    try:
        _check_degree(config, p)
    except ValueError as exc:
        raise ValueError(f"gather_state_dict got {p} shards: {exc}") from None
    for r, sd in enumerate(shards):
        check_shard_state_dict(sd, config, p, rank=r, plan=plan)
    out = {}
    for name in shards[0]:
        where = placement(name, plan)
        tensors = [sd[name].detach() for sd in shards]
        if isinstance(where, Shard):
            out[name] = gather_tensors(tensors, where.dim, where.stride)
            continue
        if isinstance(where, VocabShard):  # drop the padding rows: back to config.vocab_size
            out[name] = gather_tensors(tensors, 0)[: config.vocab_size].clone()
            continue
        if check_replicas:
            for r, t in enumerate(tensors[1:], start=1):
                if not torch.equal(t, tensors[0]):
                    raise ValueError(
                        f"replicated parameter {name} differs between rank 0 and rank {r} "
                        f"(max abs difference {(t - tensors[0]).abs().max().item():.3g})"
                    )
        out[name] = tensors[0].clone()
    return out
