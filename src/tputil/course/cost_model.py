"""A cost model: memory per rank and time per training step, for TP, TP+SP, DP, FSDP and PP (chapter 14).

Derived in chapter 14 from the pieces earlier chapters measured: parameter counts per rank
(`tp_model.param_counts_per_rank`, chapters 6 and 10), the bytes each layer saves for backward
(`activations.layer_bytes`, chapter 11), the KV cache (`kv_cache.kv_cache_bytes_per_rank`,
chapter 13), the collectives each scheme makes (chapters 6, 9, 10 and 11; `compare` for DP, FSDP
and PP) and the ring's time model (`cost.ring_time`, chapters 2 and 8). Nothing here is a second
copy of those: this module only adds them up per scheme.

Conventions. `B` sequences of `T` tokens form the global batch of one step. Memory is bytes on
one rank; time is seconds of one rank's step with nothing overlapped (compute, then every
collective, one after the other, plus the pipeline's bubble; per layer, and with what can overlap:
`layer_time`). The tensor-parallel schemes use the
vocabulary-parallel head (chapter 10), as Megatron-LM does. Which parts are run and counted by
tests (TP, TP+SP: the package has them) and which are derived only (DP, FSDP, PP: from their
definitions in `compare`) is said in tests/test_cost_model.py.

Left out, on purpose: activation recomputation, FSDP's transient full copy of the unit being
computed, the activations outside the blocks beyond the head's (a few bytes per token: token ids,
positions), allocator fragmentation and framework workspace, and any overlap of communication
with compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kv_cache import kv_cache_bytes_per_rank
from ..shard import divide
from ..tp_model import param_counts_per_rank
from . import compare
from .activations import layer_bytes, padded_length
from .cost import ring_time

SCHEMES = ("TP", "TP+SP", "DP", "FSDP", "PP")


@dataclass(frozen=True)
class Precision:
    """Bytes per number of each kind of state; `activation` is also what collectives carry."""

    name: str
    activation: int  # activations, their gradients, what TP's collectives carry
    param: int  # the weights the forward pass reads
    grad: int  # their gradients (what DP and FSDP communicate)
    optimizer: int  # AdamW's state per parameter: two moments, plus a float32 master copy in mixed precision


PRECISIONS = {
    "float32": Precision("float32", 4, 4, 4, 8),
    # bf16 weights, gradients and activations; float32 master weights and moments: 16 bytes a
    # parameter in all (Rajbhandari et al. 2020, ZeRO)
    "bf16 mixed": Precision("bf16 mixed", 2, 2, 2, 12),
}


@dataclass(frozen=True)
class Device:
    name: str
    memory: float  # bytes (GB = 1e9)
    flops: dict  # precision name -> dense FLOP/s at peak
    source: str


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s in one direction, what a ring step uses
    latency: float  # seconds per ring step: ASSUMED (no datasheet gives it), see the chapter
    source: str


DEVICES = {  # dense (no sparsity) peak FLOP/s; memory in bytes, GB = 1e9
    "H100 SXM 80GB": Device(
        "H100 SXM 80GB",
        80e9,
        {"float32": 67e12, "bf16 mixed": 989e12},
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5)",
    ),
    "H100 PCIe 80GB": Device(
        "H100 PCIe 80GB",
        80e9,
        {"float32": 51e12, "bf16 mixed": 756e12},
        "NVIDIA H100 Tensor Core GPU datasheet (PCIe)",
    ),
    "A100 SXM 80GB": Device(
        "A100 SXM 80GB",
        80e9,
        {"float32": 19.5e12, "bf16 mixed": 312e12},
        "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)",
    ),
}

LINKS = {
    "NVLink 4": Link("NVLink 4", 450e9, 5e-6, "H100 datasheet: NVLink 900 GB/s, both directions together"),
    "NVLink 3": Link("NVLink 3", 300e9, 5e-6, "A100 datasheet: NVLink 600 GB/s, both directions together"),
    "PCIe 5.0 x16": Link("PCIe 5.0 x16", 64e9, 10e-6, "PCI-SIG PCIe 5.0: 32 GT/s a lane, about 64 GB/s over 16 lanes"),
    "PCIe 4.0 x16": Link("PCIe 4.0 x16", 32e9, 10e-6, "PCI-SIG PCIe 4.0: 16 GT/s a lane, about 32 GB/s over 16 lanes"),
}


_COUNTS: dict = {}


def _vocab_parallel_params(config, p: int) -> int:
    """`param_counts_per_rank(config, p)["vocab_parallel"]`, remembered (the explorer asks hundreds of times)."""
    key = (repr(config), p)
    if key not in _COUNTS:
        _COUNTS[key] = param_counts_per_rank(config, p)["vocab_parallel"]
    return _COUNTS[key]


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {SCHEMES}")


def _precision(precision) -> Precision:
    if isinstance(precision, Precision):
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")
    return PRECISIONS[precision]


def _check_fits(config, scheme: str, B: int, p: int) -> None:
    """The divisibility each scheme needs, with the error the package itself gives."""
    if scheme in ("TP", "TP+SP"):
        divide(config.n_head, p, "n_head")
    elif scheme in ("DP", "FSDP"):
        divide(B, p, "B")
    else:
        divide(config.n_layer, p, "n_layer")


def memory(config, scheme: str, *, B: int, T: int, p: int, precision="float32", kv_cache: bool = False) -> dict:
    """Bytes one rank holds during a training step: {"params", "grads", "optimizer", "activations"}.

    params: TP and TP+SP as a rank of `VocabParallelTPGPT` (blocks and vocabulary split), DP the
    whole model, FSDP ceil(N/p), PP the busiest stage (`compare.pipeline_parallel`). grads the same
    count; optimizer AdamW's moments (and master weights in mixed precision).
    activations: the blocks' saved tensors, `activations.layer_bytes` per layer, plus the head's
    (ln_f's input and statistics, lm_head's input, the logits this rank holds); TP and TP+SP run the
    whole batch on 1/p of the heads (SP: 1/p of the tokens outside them), DP and FSDP B/p of the
    batch on every layer, PP all L/p layers of its stage on the whole batch (GPipe keeps every
    micro-batch's). With kv_cache=True a "kv_cache" entry for generation (not training) is added.
    """
    _check_scheme(scheme)
    prec = _precision(precision)
    _check_fits(config, scheme, B, p)
    L, C, V = config.n_layer, config.n_embd, config.vocab_size
    e = prec.activation
    if scheme in ("TP", "TP+SP"):
        n = _vocab_parallel_params(config, p)
        sp = scheme == "TP+SP"
        Tp = padded_length(T, p, sp)
        per_layer = sum(layer_bytes(config, B, T, p, sequence_parallel=sp, element_size=e).values())
        s = p if sp else 1
        head = (
            (B * Tp * C + 2 * B * Tp) * e // s + B * Tp * C * e // s + B * T * (-(-V // p)) * e
        )  # logits: pads dropped
        acts = L * per_layer + head
    elif scheme in ("DP", "FSDP"):
        N = compare.gpt_num_params(config)
        n = N if scheme == "DP" else -(-N // p)
        b = B // p
        per_layer = sum(layer_bytes(config, b, T, 1, sequence_parallel=False, element_size=e).values())
        acts = L * per_layer + (2 * b * T * C + 2 * b * T) * e + b * T * V * e
    else:  # PP: the busiest stage holds its L/p layers' activations for the whole batch
        n = compare.pipeline_parallel(config, B=B, T=T, p=p, micro_batches=B).params_per_rank
        per_layer = sum(layer_bytes(config, B, T, 1, sequence_parallel=False, element_size=e).values())
        acts = (L // p) * per_layer + (2 * B * T * C + 2 * B * T) * e + B * T * V * e
    out = {"params": n * prec.param, "grads": n * prec.grad, "optimizer": n * prec.optimizer, "activations": acts}
    if kv_cache:
        heads_split = p if scheme in ("TP", "TP+SP") else 1  # TP: each rank caches its heads (chapter 13)
        out["kv_cache"] = kv_cache_bytes_per_rank(config, B, T, heads_split) * e // 4  # float32's, rescaled
    return out


def layer_collectives(config, scheme: str, *, B: int, T: int, p: int, precision="float32") -> dict:
    """One layer's collectives per training step on one rank: {phase: [(kind, message bytes), ...]}.

    The message is what `CommStats` counts (the shard for all_gather). TP: forward 2 all-reduces of
    B T C, backward 2 more (chapters 6, 9). TP+SP: forward 2 all-gathers of B T C/p and 2
    reduce-scatters of B T C; backward 4 all-gathers (two recompute c_attn's and c_fc's input) and 2
    reduce-scatters (chapter 11); its replicated gradients (6C a layer) join one all-reduce per step,
    counted by `step_collectives`. DP: none in the layer (its gradients are in `step_collectives`).
    FSDP: the layer's parameters all-gathered in forward and again in backward, its gradients
    reduce-scattered. PP: none inside a stage.
    """
    _check_scheme(scheme)
    e = _precision(precision).activation
    if p == 1 or scheme in ("DP", "PP"):
        return {"forward": [], "backward": []}
    C = config.n_embd
    if scheme == "TP":
        ar = ("all_reduce", B * T * C * e)
        return {"forward": [ar, ar], "backward": [ar, ar]}
    if scheme == "TP+SP":
        Tp = padded_length(T, p, True)
        ag, rs = ("all_gather", B * Tp * C // p * e), ("reduce_scatter", B * Tp * C * e)
        return {"forward": [ag, rs, ag, rs], "backward": [ag, ag, rs, ag, ag, rs]}
    g = _precision(precision)
    n = sum(compare.layer_params(config).values())
    shard = -(-n // p)
    return {
        "forward": [("all_gather", shard * g.param)],
        "backward": [("all_gather", shard * g.param), ("reduce_scatter", shard * p * g.grad)],
    }


def step_collectives(config, scheme: str, *, B: int, T: int, p: int, precision="float32") -> dict:
    """Every collective of one training step on one rank: {phase: [(kind, message bytes), ...]}.

    The layers' (`layer_collectives`, n_layer times) and the rest: TP's vocabulary-parallel
    embedding (an all-reduce of B T C) and cross-entropy (3 all-reduces of B T) in forward, the
    head's input gradient (an all-reduce of B T C) in backward; TP+SP the same with the embedding
    reduce-scattered, ln_f's output all-gathered for the head (again in backward) and the head's
    input gradient reduce-scattered, and one all-reduce ("grad_sync") of the gradients computed on
    own tokens (norms, c_proj biases, wpe: 6C a layer + 2C + block_size C). DP: one all-reduce of
    every gradient. FSDP: the non-block parameters as one more unit. PP: sends, see `pipeline_sends`.
    """
    layer = layer_collectives(config, scheme, B=B, T=T, p=p, precision=precision)
    L, C = config.n_layer, config.n_embd
    out = {"forward": layer["forward"] * L, "backward": layer["backward"] * L, "grad_sync": []}
    if p == 1 or scheme == "PP":
        return out
    prec = _precision(precision)
    e = prec.activation
    if scheme == "TP":
        out["forward"] += [("all_reduce", B * T * C * e)] + [("all_reduce", B * T * e)] * 3
        out["backward"] += [("all_reduce", B * T * C * e)]
    elif scheme == "TP+SP":
        Tp = padded_length(T, p, True)
        ag, rs = ("all_gather", B * Tp * C // p * e), ("reduce_scatter", B * Tp * C * e)
        out["forward"] += [rs, ag] + [("all_reduce", B * T * e)] * 3
        out["backward"] += [ag, ag, rs]
        out["grad_sync"] = [("all_reduce", (6 * C * L + 2 * C + config.block_size * C) * prec.grad)]
    elif scheme == "DP":
        out["grad_sync"] = [("all_reduce", compare.gpt_num_params(config) * prec.grad)]
    else:  # FSDP: the embeddings and ln_f as one more unit
        rest = compare.gpt_num_params(config) - L * sum(compare.layer_params(config).values())
        shard = -(-rest // p)
        out["forward"] += [("all_gather", shard * prec.param)]
        out["backward"] += [("all_gather", shard * prec.param), ("reduce_scatter", shard * p * prec.grad)]
    return out


def layer_forward_flops(config, *, B: int, Tq: int, Tk: int | None = None) -> int:
    """One layer's forward FLOPs for B sequences of Tq new tokens attending to Tk keys (Tk = Tq in
    training): 24 B Tq C^2 (the four matrices, chapter 8) + 4 B Tq Tk C (scores and their weighted sum)."""
    C = config.n_embd
    return 24 * B * Tq * C * C + 4 * B * Tq * (Tq if Tk is None else Tk) * C


def flops_per_step(config, *, B: int, T: int) -> float:
    """FLOPs of one training step of the whole model: 3 times the forward pass (backward does twice its work).

    Forward per layer `layer_forward_flops`, and the head 2 B T C V.
    """
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    return 3 * (L * layer_forward_flops(config, B=B, Tq=T) + 2 * B * T * C * V)


def step_time(config, scheme: str, *, B: int, T: int, p: int, precision, device: Device, link: Link) -> dict:
    """Seconds of one rank's training step: {"compute", "communication", "bubble"}, nothing overlapped.

    compute: the step's FLOPs over p at the device's peak for the precision (PP: the busiest stage,
    L/p layers and the head, for the whole batch). communication: each collective's ring time
    (`cost.ring_time` at the link's latency and bandwidth). PP: 2m sends of B T C / m numbers (m = B
    micro-batches), each one latency plus its bytes, and the tied embedding's all-reduce between
    two stages; bubble (p - 1)/m of the compute (GPipe).
    """
    _check_scheme(scheme)
    prec = _precision(precision)
    _check_fits(config, scheme, B, p)
    F = device.flops[prec.name]
    total = flops_per_step(config, B=B, T=T)
    bubble = 0.0
    if scheme == "PP":
        C, L, V = config.n_embd, config.n_layer, config.vocab_size
        stage = 3 * ((L // p) * layer_forward_flops(config, B=B, Tq=T) + 2 * B * T * C * V)
        compute = stage / F
        if p == 1:
            return {"compute": compute, "communication": 0.0, "bubble": 0.0}
        m = B
        sends = 2 * m * (link.latency + (B // m) * T * C * prec.activation / link.bandwidth)
        tied = ring_time("all_reduce", V * C * prec.grad, 2, latency=link.latency, bandwidth=link.bandwidth)
        bubble = compute * (p - 1) / m
        return {"compute": compute, "communication": sends + tied, "bubble": bubble}
    compute = total / p / F
    comm = 0.0
    for calls in step_collectives(config, scheme, B=B, T=T, p=p, precision=prec).values():
        comm += sum(ring_time(k, n, p, latency=link.latency, bandwidth=link.bandwidth) for k, n in calls)
    return {"compute": compute, "communication": comm, "bubble": bubble}


def tp_layer_times(config, *, B: int, T: int, p: int, precision, device: Device, link: Link) -> tuple[float, float]:
    """(compute, communication) seconds of one layer's forward and backward under TP, latency included.

    TP "pays" at p when communication <= compute: p ranks then run the layer at least p/2 times as
    fast as one device (chapter 8's R(p) <= 1, here with latency and the attention scores).
    `layer_time.layer_time(config, "TP", ...)`'s compute and its collectives added up, nothing overlapped.
    """
    from .layer_time import layer_time  # it builds on this module; the per-layer model lives there

    t = layer_time(config, "TP", B=B, T=T, p=p, precision=precision, device=device, link=link)
    return t["compute"], sum(t["collectives"].values())


def binding(mem: dict, times: dict, device: Device) -> str:
    """Which constraint binds: "memory" if the rank's bytes exceed the device's, else the larger of
    "communication" and "compute" (the bubble counts as neither: it is waiting)."""
    if sum(mem.values()) > device.memory:
        return "memory"
    return "communication" if times["communication"] > times["compute"] else "compute"
