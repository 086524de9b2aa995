"""Dropout and random-number state under tensor parallelism: which ranks must draw the same mask.

Derived in chapter 12. Three kinds of dropout site, by what the ranks hold there:

- "replicated": every rank holds the same whole tensor (the embedding dropout, and the residual
  dropouts after each all-reduce): every rank must draw the SAME mask, or the ranks' residual
  streams part and the next all-reduce sums partial results of different inputs;
- "tensor": each rank holds its own part (the attention weights of its own heads): the masks must
  be INDEPENDENT across ranks, or rank 1's heads repeat rank 0's pattern;
- "sequence": with sequence parallelism each rank holds its own tokens: independent as well.

`RNGTracker(seed, rank=r)` holds two random states, as Megatron-LM's model-parallel RNG tracker
does: one seeded with `seed` on every rank (replicated sites) and one seeded with
seed + PARALLEL_SEED_OFFSET + r (tensor and sequence sites; Megatron-LM offsets by 2718 too).
Each state is an explicit `torch.Generator` per device: ranks run as threads (`comm.run_threads`)
share torch's default generator, so the model draws from the tracker's generators and never from
the global state. `fork(region)` is Megatron-LM's context manager for code that draws from the
global generator (plain `nn.Dropout`): inside it the global generator continues the region's
state, and on exit it is restored. For one process per rank only.

`Dropout` is the one dropout module of the dense and the tensor-parallel GPT. Left alone it is
exactly `nn.Dropout`; it can draw from a tracker, record the masks it drew, or replay given ones
(`recording`, `replaying`), and `assemble_masks` turns the ranks' recorded masks into the dense
model's full-shape masks: run the dense model with them and it computes what the ranks computed.
"""

import math
import threading
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn import functional as F

REGIONS = ("replicated", "tensor", "sequence")
PARALLEL_SEED_OFFSET = 2718  # Megatron-LM's offset between the data-parallel and the model-parallel seed


def _check_region(region):
    if region not in REGIONS:
        raise ValueError(f"region={region!r}: a dropout site is one of {REGIONS}")


class Dropout(nn.Module):
    """y = x * mask / (1 - p), mask True with probability 1 - p; nn.Dropout with its random state explicit.

    Left alone (rng, record and replay None), exactly nn.Dropout: F.dropout from torch's global
    generator. Three hooks, set by a model or by `recording` / `replaying`:
    - rng: an `RNGTracker`; the mask is rand(x.shape) >= p, drawn in float32 on x's device from
      its generator for this site's `region`;
    - record: a list; each mask drawn (bool, x's shape) is appended;
    - replay: a list of masks; each call takes the first one instead of drawing.
    In eval mode the identity, with nothing drawn, recorded or replayed; at p = 0 nothing is drawn.
    """

    def __init__(self, p: float, *, region: str = "replicated"):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p={p!r}: it must be in [0, 1)")
        _check_region(region)
        self.p = p
        self.region = region
        self.rng = None
        self.record = None
        self.replay = None

    def extra_repr(self):
        return f"p={self.p}, region={self.region!r}"

    def forward(self, x):
        if self.rng is None and self.record is None and self.replay is None:
            return F.dropout(x, self.p, self.training)  # nn.Dropout's behaviour
        if not self.training or (self.p == 0.0 and self.record is None and self.replay is None):
            return x
        if self.replay is not None:
            if not self.replay:
                raise RuntimeError("Dropout.replay ran out of masks: give one mask per call of this site")
            mask = self.replay.pop(0)
            if mask.shape != x.shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"a replayed mask of shape {tuple(mask.shape)} and dtype {mask.dtype} for an input of "
                    f"shape {tuple(x.shape)}: masks are bool tensors of the input's shape"
                )
            mask = mask.to(x.device)
        elif self.p == 0.0:
            mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)  # recorded; nothing drawn
        else:
            generator = None if self.rng is None else self.rng.generator(self.region, x.device)
            mask = torch.rand(x.shape, generator=generator, device=x.device) >= self.p  # keep with prob. 1 - p
        if self.record is not None:
            self.record.append(mask)
        return x * mask * (1.0 / (1.0 - self.p))


class RNGTracker:
    """One rank's random states: "replicated" (seed, the same on every rank) and the parallel one.

    The parallel state, seeded seed + PARALLEL_SEED_OFFSET + rank, serves "tensor" and "sequence"
    sites: independent across ranks. `generator(region, device)` is the generator to draw from
    (made on first use for each device); `manual_seed(seed)` starts both states again.
    """

    _forking = threading.Lock()  # one fork at a time in a process: the global generator is one

    def __init__(self, seed: int, *, rank: int):
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank={rank!r}: it must be a non-negative integer")
        self.rank = rank
        self.manual_seed(seed)

    def manual_seed(self, seed: int):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r}: it must be an integer")
        self.seed = seed
        self.seeds = {"replicated": seed, "parallel": seed + PARALLEL_SEED_OFFSET + self.rank}
        self._generators = {}  # (state, device) -> torch.Generator
        return self

    def generator(self, region: str, device="cpu") -> torch.Generator:
        """The generator of `region`'s state on `device`; drawing from it advances that state."""
        _check_region(region)
        state = "replicated" if region == "replicated" else "parallel"
        device = torch.device(device)
        key = (state, str(device))
        if key not in self._generators:
            self._generators[key] = torch.Generator(device).manual_seed(self.seeds[state])
        return self._generators[key]

    @contextmanager
    def fork(self, region: str, device="cpu"):
        """Draw from torch's global generator as from `region`'s state; the global state is restored after.

        For code that uses the global generator (plain nn.Dropout) in a process of its own. Ranks
        as threads share the global generator: a second fork while one is open raises.
        """
        generator = self.generator(region, device)
        device = torch.device(device)
        if not self._forking.acquire(blocking=False):
            raise RuntimeError(
                "RNGTracker.fork: another fork is open in this process (ranks as threads share torch's "
                "global generator): draw from tracker.generator(region) instead, as the model does"
            )
        try:
            cuda = device.type == "cuda"
            saved = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
            set_state = (lambda s: torch.cuda.set_rng_state(s, device)) if cuda else torch.set_rng_state
            set_state(generator.get_state())
            try:
                yield generator
            finally:
                generator.set_state(torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state())
                set_state(saved)
        finally:
            self._forking.release()


def dropout_sites(model) -> dict:
    """{name: Dropout} of every dropout site in `model`, in the order of `named_modules`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Dropout)}


def use_rng(model, rng):
    """Make every dropout site of `model` draw from `rng` (an RNGTracker; None: the global generator).

    Also kept as `model.rng`. Returns model.
    """
    for site in dropout_sites(model).values():
        site.rng = rng
    model.rng = rng
    return model


@contextmanager
def recording(model):
    """Inside: every mask `model`'s dropout sites draw is recorded; yields {name: [mask per call]}."""
    sites = dropout_sites(model)
    masks = {name: [] for name in sites}
    for name, site in sites.items():
        site.record = masks[name]
    try:
        yield masks
    finally:
        for site in sites.values():
            site.record = None


@contextmanager
def replaying(model, masks: dict):
    """Inside: `model`'s dropout sites use `masks` ({name: [mask per call]}) in order instead of drawing.

    Every site must be named; on a normal exit every mask must have been used.
    """
    sites = dropout_sites(model)
    if set(masks) != set(sites):
        raise ValueError(
            f"masks for sites {sorted(set(masks) - set(sites))} that the model lacks, none for "
            f"{sorted(set(sites) - set(masks))}: give one list of masks per dropout site"
        )
    queues = {name: list(masks[name]) for name in sites}
    for name, site in sites.items():
        site.replay = queues[name]
    try:
        yield
    finally:
        for site in sites.values():
            site.replay = None
    left = {name: len(q) for name, q in queues.items() if q}
    if left:
        raise RuntimeError(f"masks left unused after replaying: {left}")


def gather_rank_masks(masks: dict, group) -> list:
    """Every rank's recorded masks ({name: [mask per call]}), gathered: a list in rank order, on every rank.

    One all-gather per site, of its calls stacked, as uint8 (what every backend sends); the ranks
    must have recorded the same sites, calls and shapes (true of one model's ranks, sequence
    parallelism included: T is padded to a multiple of p).
    """
    ranks = [{} for _ in range(group.world_size)]
    for name, calls in masks.items():
        if not calls:
            for r in range(group.world_size):
                ranks[r][name] = []
            continue
        stacked = torch.stack(calls).to(torch.uint8).unsqueeze(0)  # (1, calls, ...)
        gathered = group.all_gather(stacked, dim=0, tag="gather_rank_masks").bool()  # (p, calls, ...)
        for r in range(group.world_size):
            ranks[r][name] = list(gathered[r].unbind(0))
    return ranks


def assemble_masks(rank_masks: list, regions: dict, *, seq_len: int | None = None) -> dict:
    """The dense model's full-shape masks from the ranks' recorded ones ({name: [mask per call]} per rank).

    regions: {name: region}. "replicated": every rank's mask must be the same (else ValueError),
    taken once; "tensor" (the attention weights of a rank's heads, (B, nh/p, T, T)) and
    "sequence" (a rank's tokens, (B, T/p, C)): the ranks' masks concatenated in rank order along
    dim 1. seq_len: crop the positions to the first seq_len (a sequence-parallel model pads T to a
    multiple of p): dim 1 of "sequence" masks, the last two dims of "tensor" ones.
    """
    names = set(rank_masks[0])
    if any(set(m) != names for m in rank_masks) or set(regions) != names:
        raise ValueError("every rank, and regions, must name the same dropout sites")
    full = {}
    for name in rank_masks[0]:
        region = regions[name]
        _check_region(region)
        calls = [m[name] for m in rank_masks]
        if len({len(c) for c in calls}) != 1:
            raise ValueError(f"{name}: the ranks recorded different numbers of masks {[len(c) for c in calls]}")
        full[name] = []
        for i, per_rank in enumerate(zip(*calls)):
            if region == "replicated":
                if not all(torch.equal(per_rank[0], m) for m in per_rank[1:]):
                    raise ValueError(
                        f"{name} (call {i}) is a replicated site, but the ranks drew different masks: "
                        f"seed its state alike on every rank (RNGTracker(seed, rank=r), the same seed)"
                    )
                mask = per_rank[0]
            else:
                mask = torch.cat(per_rank, dim=1)
                if seq_len is not None and region == "sequence":
                    mask = mask[:, :seq_len]
                elif seq_len is not None:
                    mask = mask[..., :seq_len, :seq_len]
            full[name].append(mask)
    return full


def mask_correlation(a, b) -> float:
    """Pearson correlation of two masks (the same number of elements n) as 0/1 numbers.

    Counted in integers, (n sum(ab) - sum(a) sum(b)) / sqrt((n sum(a) - sum(a)^2)(n sum(b) - sum(b)^2)),
    the square's quotient rounded once, so a repeated mask gives exactly 1.0. Independent masks give
    about normal(0, 1/n).
    """
    a, b = a.reshape(-1).bool(), b.reshape(-1).bool()
    n = a.numel()
    if n != b.numel() or n < 2:
        raise ValueError(f"masks of {n} and {b.numel()} elements: need the same number, at least 2")
    sa, sb, sab = int(a.sum()), int(b.sum()), int((a & b).sum())
    va, vb = n * sa - sa * sa, n * sb - sb * sb
    if va == 0 or vb == 0:
        raise ValueError("a mask that is all kept or all dropped has no correlation")
    num = n * sab - sa * sb
    return math.copysign(math.sqrt(num * num / (va * vb)), num)  # int / int: correctly rounded
