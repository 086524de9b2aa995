"""Time per layer for TP, TP+SP, DP, FSDP and PP, and the time of generating tokens (chapter 14).

Derived in chapter 14, beside `cost_model` (which adds up a whole training step): here one
transformer layer's forward and backward on one rank, split into its compute (FLOPs at the
device's peak), each collective by kind at its ring time (`cost.ring_time`, chapter 2), and what
of that communication can overlap with compute and what cannot, scheme by scheme (`OVERLAP`).
The collectives are `cost_model.layer_collectives`' (counted on real ranks for TP and TP+SP by
tests/test_cost_model.py and chapter 14); DP's, FSDP's and PP's are derived from their
definitions in `course.compare` (chapter 6), not run.

`generation_time` is chapter 13's decoding in the same terms: each call of the model during
`generate`, its FLOPs (with the KV cache one new token against the cached keys; without it the
whole context again) and, under TP, its 2L all-reduces of the fed tokens' activations.
"""

from __future__ import annotations

from . import compare
from .cost import ring_time
from .cost_model import _check_fits, _check_scheme, _precision, layer_collectives, layer_forward_flops

# What each scheme's per-layer communication can hide behind, as `layer_time` models it.
OVERLAP = {
    "TP": "forward's 2 all-reduces exposed (the next product needs the sum); backward's 2 (of dL/dx) "
    "can hide behind the weight-gradient products, half the backward (chapter 8's backward overlap)",
    "TP+SP": "forward's all-gathers and reduce-scatters exposed (the next product needs them); "
    "backward's can hide behind the weight-gradient products, half the backward",
    "DP": "the layer's gradient all-reduce can hide behind the backward (DDP's buckets: "
    "the layers before it are still computing)",
    "FSDP": "the forward all-gather can hide behind forward compute (prefetched during the layer "
    "before), the backward all-gather and reduce-scatter behind backward compute",
    "PP": "the stage boundary's sends can hide behind other micro-batches' compute; the bubble cannot",
}


def layer_calls(config, scheme: str, *, B: int, T: int, p: int, precision="float32") -> dict:
    """One layer's communication on one rank per training step: {"forward": [...], "backward": [...]}.

    Items (kind, message bytes) as `CommStats` counts them. TP, TP+SP, FSDP: `cost_model.layer_collectives`.
    DP: the layer's gradients all-reduced in backward (one bucket per layer). PP: the stage
    boundary's point-to-point sends ("send"), m = B micro-batches of B T C / m numbers each way,
    charged to a stage's L/p layers equally (a fraction of a send per layer, in bytes).
    """
    _check_scheme(scheme)
    prec = _precision(precision)
    if p == 1:
        return {"forward": [], "backward": []}
    if scheme in ("TP", "TP+SP", "FSDP"):
        return layer_collectives(config, scheme, B=B, T=T, p=p, precision=prec)
    if scheme == "DP":
        n = sum(compare.layer_params(config).values())
        return {"forward": [], "backward": [("all_reduce", n * prec.grad)]}
    share = p / config.n_layer  # one stage boundary per L/p layers
    send = ("send", B * T * config.n_embd * prec.activation * share)  # the m messages' bytes together
    return {"forward": [send], "backward": [send]}


def _seconds(kind: str, nbytes: float, p: int, link, messages: float) -> float:
    if kind == "send":  # point to point: one latency per message, the bytes once
        return messages * link.latency + nbytes / link.bandwidth
    return ring_time(kind, nbytes, p, latency=link.latency, bandwidth=link.bandwidth)


def layer_time(config, scheme: str, *, B: int, T: int, p: int, precision, device, link) -> dict:
    """Seconds one rank spends on one layer of a training step (forward and backward), by part.

    compute: the layer's FLOPs (3 times the forward) at the device's peak; TP and TP+SP split the
    heads, DP and FSDP the batch (both: 1/p of the work), PP runs the layer on the whole batch
    (a rank holds L/p layers). collectives: {kind: seconds}, each call at its ring time (PP's
    sends: a latency per message plus the bytes), calls: {kind: number of calls} (PP: one forward
    and one backward entry, the layer's share of the boundary's sends). exposed: the
    communication nothing can hide; overlappable: the rest; hidden: how much of it the model lets
    compute hide (per phase, at most that phase's hideable compute, `OVERLAP`). bubble: PP's
    (p - 1)/m of the compute (GPipe, m = B). serial = compute + every collective + bubble;
    overlapped = serial - hidden.
    """
    _check_scheme(scheme)
    prec = _precision(precision)
    _check_fits(config, scheme, B, p)
    split = 1 if scheme == "PP" else p
    fwd = layer_forward_flops(config, B=B, Tq=T) / split / device.flops[prec.name]
    compute = {"forward": fwd, "backward": 2 * fwd}
    calls = layer_calls(config, scheme, B=B, T=T, p=p, precision=prec)
    messages = B * p / config.n_layer  # PP: m = B messages a boundary, over L/p layers
    phase_comm = {ph: sum(_seconds(k, n, p, link, messages) for k, n in c) for ph, c in calls.items()}
    if scheme in ("TP", "TP+SP"):
        hideable = {"forward": 0.0, "backward": compute["backward"] / 2}  # the weight-gradient products
    else:  # DP (backward only), FSDP, PP: behind the same phase's compute
        hideable = dict(compute)
    exposed = sum((phase_comm[ph] for ph in phase_comm if hideable[ph] == 0), 0.0)
    overlappable = sum((phase_comm[ph] for ph in phase_comm if hideable[ph] > 0), 0.0)
    hidden = sum((min(phase_comm[ph], hideable[ph]) for ph in phase_comm), 0.0)
    by_kind, counts = {}, {}
    for c in calls.values():
        for k, n in c:
            by_kind[k] = by_kind.get(k, 0.0) + _seconds(k, n, p, link, messages)
            counts[k] = counts.get(k, 0) + 1
    total = fwd + 2 * fwd
    bubble = total * (p - 1) / B if scheme == "PP" else 0.0
    serial = total + sum(phase_comm.values()) + bubble
    return {
        "compute": total,
        "collectives": by_kind,
        "calls": counts,
        "exposed": exposed,
        "overlappable": overlappable,
        "hidden": hidden,
        "bubble": bubble,
        "serial": serial,
        "overlapped": serial - hidden,
    }


def generation_time(
    config,
    *,
    B: int,
    prompt: int,
    new_tokens: int,
    p: int,
    kv_cache: bool,
    device,
    link,
    precision="float32",
) -> dict:
    """Seconds of `generate(model, idx (B, prompt), new_tokens)` on one rank: compute and communication.

    `generate` calls the model new_tokens times. With the KV cache the first call feeds the
    prompt, each later one the newest token, whose queries meet all t cached keys; without it every
    call feeds the whole context of t = prompt + i tokens. One call feeding Tq tokens against Tk
    keys does L (24 B Tq C^2 + 4 B Tq Tk C) FLOPs in the blocks, split over p ranks, and 2 B Tq C V
    in the replicated head (`TPGPT`'s, as in chapter 13's benchmark), and under
    TP 2L all-reduces of B Tq C numbers (chapter 13). Returns compute, communication, the number of
    all-reduces and their message bytes (what `CommStats` counts), and tokens_per_second =
    B new_tokens / (compute + communication). Within block_size only: past it the window slides and
    the cache is refilled (`model.generate`).
    """
    if prompt < 1 or new_tokens < 1:
        raise ValueError(f"prompt={prompt} and new_tokens={new_tokens} must both be >= 1")
    if prompt + new_tokens - 1 > config.block_size:
        raise ValueError(
            f"prompt {prompt} + new_tokens {new_tokens} - 1 > block_size {config.block_size}: past it the "
            f"window slides and the cache is refilled, which this model leaves out; generate fewer tokens"
        )
    prec = _precision(precision)
    L, C, V = config.n_layer, config.n_embd, config.vocab_size
    F = device.flops[prec.name]
    compute = communication = 0.0
    all_reduces = message_bytes = 0
    for i in range(new_tokens):
        Tk = prompt + i
        Tq = (prompt if i == 0 else 1) if kv_cache else Tk
        blocks = L * layer_forward_flops(config, B=B, Tq=Tq, Tk=Tk)
        head = 2 * B * Tq * C * V
        compute += (blocks / p + head) / F
        if p > 1:
            one = ring_time(
                "all_reduce", B * Tq * C * prec.activation, p, latency=link.latency, bandwidth=link.bandwidth
            )
            communication += 2 * L * one
            all_reduces += 2 * L
            message_bytes += 2 * L * B * Tq * C * prec.activation
    seconds = compute + communication
    return {
        "compute": compute,
        "communication": communication,
        "all_reduces": all_reduces,
        "all_reduce_bytes": message_bytes,
        "tokens_per_second": B * new_tokens / seconds,
    }
