"""Activation memory: the bytes a forward pass keeps for backward, measured and derived (chapter 11).

`saved_bytes(model, run)` runs `run()` (a forward pass of `model`, with autograd recording) inside
`torch.autograd.graph.saved_tensors_hooks` and sums, per region, the bytes of every tensor that
autograd saves for backward: each storage once (q, k and v are views of one tensor; softmax and
the next matmul save the same one), parameters left out (they are not activations). A region is
where the tensor was saved: `"ln_1"`, `"attn"`, `"ln_2"`, `"mlp"` (summed over the layers), or
outside the blocks `"embedding"`, `"ln_f"`, `"lm_head"` and `"loss"` (the model's own code).

`layer_bytes(...)` is the same count for one layer, derived from what our layers save; the
chapter derives it term by term and checks it equal to the measurement. `korthikanti_bytes` is
the published formula (Korthikanti et al. 2022): 34 s b h + 5 a s^2 b bytes per layer without
tensor parallelism, for 16-bit activations with dropout masks and a fused softmax.
"""

from collections import Counter

import torch

BLOCK_REGIONS = ("ln_1", "attn", "ln_2", "mlp")
TOP_REGIONS = ("embedding", "ln_f", "lm_head", "loss")


def region_of(module_name: str) -> str:
    """The region of a module of the (dense or tensor-parallel) GPT, by its name; "" is the model itself."""
    parts = module_name.split(".")
    if parts[:2] == ["transformer", "h"] and len(parts) >= 4:
        return parts[3]  # transformer.h.<i>.<ln_1 | attn | ln_2 | mlp>...
    if parts[:2] in (["transformer", "wte"], ["transformer", "wpe"], ["transformer", "drop"]):
        return "embedding"
    if parts[:2] == ["transformer", "ln_f"]:
        return "ln_f"
    if parts[0] == "lm_head":
        return "lm_head"
    return "loss"  # saved by the model's own forward: the loss (and the head's gather)


def _local(t):
    """What this rank stores of t: a DTensor's local tensor (PyTorch's TP, chapter 15), else t."""
    if hasattr(t, "to_local"):
        with torch.no_grad():
            return t.to_local()
    return t


def saved_bytes(model, run) -> Counter:
    """{region: bytes saved for backward while run() runs}; each storage once, parameters excluded.

    run: a function of no arguments that runs a forward pass of `model` (its result is discarded,
    so its saved tensors are freed afterwards). Works on `comm.run_threads` ranks: the hooks are
    per thread and per module. A DTensor counts its local tensor (chapter 15).
    """
    stack, totals, seen = ["loss"], Counter(), set()
    params = {_local(q).untyped_storage().data_ptr() for q in model.parameters()}

    def push(region):
        return lambda module, args: stack.append(region)

    def pop(module, args, output):
        stack.pop()

    def pack(t):
        storage = _local(t).untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            totals[stack[-1]] += storage.nbytes()
        return t

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(push(region_of(name))))
            handles.append(module.register_forward_hook(pop))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in handles:
            h.remove()
    return totals


def padded_length(T: int, p: int, sequence_parallel: bool) -> int:
    """The T the layers see: under sequence parallelism padded at the end to a multiple of p."""
    return -(-T // p) * p if sequence_parallel else T


def layer_bytes(config, B: int, T: int, p: int, *, sequence_parallel: bool, element_size: int) -> dict:
    """Bytes one layer saves for backward on one rank, per region, from what our layers save.

    x = B T C numbers (T padded under sequence parallelism); s = p with sequence parallelism, else 1.
    ln_1, ln_2: the input x and the mean and 1/std (B T each): (x + 2 B T) e / s.
    attn: c_attn's input x e / s (under SP only X_r: the all-gathered X is recomputed in backward);
    q, k^T and v, 3 x e / p (the batched matmuls save contiguous copies of the heads' views);
    softmax's output, a B T^2 e / p (att @ v saves the same tensor); the causal mask, T^2 bool
    (one byte each, not split); c_proj's input x e / p.
    mlp: c_fc's input x e / s; GELU's input and output (c_proj's input), 4 x e / p each.
    """
    T = padded_length(T, p, sequence_parallel)
    C, a, e = config.n_embd, config.n_head, element_size
    s = p if sequence_parallel else 1
    x = B * T * C
    norm = (x + 2 * B * T) * e // s
    attn = x * e // s + 3 * x * e // p + a * B * T * T * e // p + T * T + x * e // p
    mlp = x * e // s + 2 * 4 * x * e // p
    return {"ln_1": norm, "attn": attn, "ln_2": norm, "mlp": mlp}


def korthikanti_bytes(s: int, b: int, h: int, a: int, t: int = 1, *, sequence_parallel: bool = False) -> float:
    """Korthikanti et al. (2022), activation bytes per layer (16-bit, dropout masks of one byte, no recomputation).

    Tensor parallelism of degree t: s b h (10 + 24/t + 5 a s / (h t)); with sequence parallelism
    everything over t: s b h (34 + 5 a s / h) / t.
    """
    if sequence_parallel:
        return s * b * h * (34 + 5 * a * s / h) / t
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
