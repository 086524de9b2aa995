"""Tensor, data and pipeline parallelism side by side: what one rank sends and stores, computed.

Derived in chapter 6, which checks the tensor-parallel numbers (forward and backward) and the
data-parallel ones against the counter (`group.stats`) of real runs on `run_threads`; the
pipeline numbers come from the formulas alone (the package has no pipeline).

Everything is per rank, for a GPT (`model.GPTConfig`) on a global batch of B sequences of T
tokens, in *numbers* (tensor elements; times 4 for bytes in float32):

- `message`: the sizes of the tensors a rank passes into its collectives or sends, which is what
  `CommStats` counts (`m.bytes[kind] / element_size`);
- `wire`: what the rank actually puts on the wire: a ring all-reduce of n numbers sends
  2(p-1)/p * n per rank (chapter 2), a point-to-point send of n numbers sends n.

The assumptions, one scheme each (p ranks):

- TP (Megatron, this book's `TPGPT`): every rank runs the whole batch; attention is split by
  heads and the MLP by hidden features, embeddings, norms, lm_head and the row-parallel biases
  are replicated. Forward: two all-reduces per layer, each of B*T*C numbers; backward: two more
  (the f in front of c_attn and of c_fc). A replicated parameter gets the same gradient on every
  rank, so no gradient is all-reduced. p must divide n_head.
- DP (replicas): every rank holds the whole model and runs B/p of the batch. Forward sends
  nothing; after backward, one all-reduce of every gradient, `params` numbers (real libraries
  cut it into buckets, more calls of the same total; we count one). p must divide B.
- PP (GPipe schedule): the n_layer blocks in p equal stages, the batch in m micro-batches. Each
  stage boundary carries the activations forward (B*T*C numbers in m sends of B/m sequences)
  and their gradients backward (as many). The embeddings live on the first stage, ln_f and
  lm_head on the last; with tied weights the last stage keeps its own copy of wte, and the two
  copies' gradients are summed by one all-reduce of V*C numbers between those two stages per
  step. The busiest rank is reported. A stage waits (p-1)/(m+p-1) of the step: the bubble.
  p must divide n_layer and m must divide B.

- FSDP (ZeRO-3, `fully_sharded`): replicas as in DP, but each rank stores 1/p of the parameters,
  gradients and optimizer state; the parameters are all-gathered before the forward and again before
  the backward, the gradients reduce-scattered: 3(p-1)/p * N numbers sent per step, 1.5 times DP's.

Memory: `params_per_rank`, and `training_state_per_rank` (parameters, gradients, two AdamW moments).
Not counted anywhere: activations, FSDP's transient full copy of the unit being computed,
overlap of communication with compute, and latency (every call costs the same per number).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..shard import divide
from .cost import ring_bytes

__all__ = [
    "Traffic",
    "gpt_num_params",
    "layer_params",
    "tensor_parallel",
    "data_parallel",
    "pipeline_parallel",
    "fully_sharded",
    "compare",
]


def _ring_all_reduce(n: float, p: int) -> float:
    """Numbers one rank sends in a ring all-reduce of n numbers: 2(p-1)/p * n (0 at p = 1)."""
    return ring_bytes("all_reduce", n, p)  # linear in its size: numbers in, numbers out


def layer_params(config) -> dict:
    """One block's parameters, split into what TP shards and what it replicates.

    sharded: c_attn (3C*C + 3C), attn.c_proj's weight (C*C), c_fc (4C*C + 4C), mlp.c_proj's
    weight (4C*C): 12C^2 + 7C with biases. replicated: ln_1 and ln_2 (2C each), the two
    row-parallel biases (C each): 6C.
    """
    C, b = config.n_embd, int(config.bias)
    sharded = 3 * C * C + b * 3 * C + C * C + 4 * C * C + b * 4 * C + 4 * C * C
    replicated = (1 + b) * C * 2 + b * C * 2
    return {"sharded": sharded, "replicated": replicated}


def gpt_num_params(config) -> int:
    """All parameters of `model.GPT(config)`, the tied wte/lm_head counted once, wpe included."""
    C, b = config.n_embd, int(config.bias)
    per_layer = sum(layer_params(config).values())
    return config.vocab_size * C + config.block_size * C + config.n_layer * per_layer + (1 + b) * C


@dataclass(frozen=True)
class Traffic:
    """What one rank communicates and stores under one scheme (numbers, not bytes; see the module)."""

    scheme: str
    p: int
    forward_calls: int  # collectives and sends one rank makes in a forward pass
    forward_message: int  # numbers it passes into them (what group.stats counts)
    forward_wire: float  # numbers it sends on the wire
    step_calls: int  # the same for a training step: forward + backward (+ gradient sync)
    step_message: int
    step_wire: float
    params_per_rank: int  # parameters this rank holds
    idle_fraction: float = 0.0  # the pipeline bubble; 0 for the others

    @property
    def training_state_per_rank(self) -> int:
        """Numbers a rank keeps between steps: its parameters, their gradients and AdamW's two moments."""
        return 4 * self.params_per_rank


def tensor_parallel(config, *, B: int, T: int, p: int) -> Traffic:
    """Megatron TP as `TPGPT` does it: 2 all-reduces of B*T*C per layer forward, 2 more backward."""
    divide(config.n_head, p, "n_head")
    L, n = config.n_layer, B * T * config.n_embd
    calls = 0 if p == 1 else 2 * L  # p = 1 communicates nothing
    sharded = L * layer_params(config)["sharded"]
    return Traffic(
        "tensor",
        p,
        calls,
        calls * n,
        calls * _ring_all_reduce(n, p),
        2 * calls,
        2 * calls * n,
        2 * calls * _ring_all_reduce(n, p),
        gpt_num_params(config) - sharded + sharded // p,
    )


def data_parallel(config, *, B: int, T: int, p: int) -> Traffic:
    """Replicas on B/p sequences each; one all-reduce of all gradients per step, nothing in forward."""
    divide(B, p, "B")  # every replica gets B/p sequences
    params = gpt_num_params(config)
    calls = 0 if p == 1 else 1
    return Traffic("data", p, 0, 0, 0.0, calls, calls * params, calls * _ring_all_reduce(params, p), params)


def pipeline_parallel(config, *, B: int, T: int, p: int, micro_batches: int) -> Traffic:
    """GPipe: p stages of n_layer/p blocks, m micro-batches; the busiest rank's sends (see the module)."""
    L, m, C, V = config.n_layer, micro_batches, config.n_embd, config.vocab_size
    divide(L, p, "n_layer")  # every stage gets n_layer/p blocks
    if not isinstance(m, int) or m < 1 or B % m:
        raise ValueError(f"micro_batches={m!r} must be a positive integer dividing B={B}")
    n, b = B * T * C, int(config.bias)
    blocks = (L // p) * sum(layer_params(config).values())
    first_params = blocks + V * C + config.block_size * C
    last_params = blocks + (1 + b) * C + V * C  # ln_f and its own copy of the tied wte for lm_head
    if p == 1:
        return Traffic("pipeline", 1, 0, 0, 0.0, 0, 0, 0.0, gpt_num_params(config))
    # (calls, message, wire) per step for each stage: sends forward unless last, backward unless first,
    # and the first and last stages sum their copies of wte's gradient (an all-reduce of 2 ranks).
    stages = []
    for s in range(p):
        sends = int(s < p - 1) + int(s > 0)
        tied = int(s in (0, p - 1))
        stages.append((sends * m + tied, sends * n + tied * V * C, sends * n + tied * _ring_all_reduce(V * C, 2)))
    step_calls, step_message, step_wire = max(stages, key=lambda c: c[2])
    idle = (p - 1) / (m + p - 1)
    return Traffic(
        "pipeline", p, m, n, float(n), step_calls, step_message, step_wire, max(first_params, last_params), idle
    )


def fully_sharded(config, *, B: int, T: int, p: int) -> Traffic:
    """ZeRO-3 / FSDP: replicas on B/p sequences each, every parameter, gradient and optimizer state split
    into p flat shards (N padded to a multiple of p). Forward: an all-gather of the parameters; backward:
    another (they are freed after use) and a reduce-scatter of the gradients. Counted as one flat unit:
    real FSDP gathers module by module (more calls, the same numbers)."""
    divide(B, p, "B")
    params = gpt_num_params(config)
    shard = -(-params // p)  # ceil(N / p): this rank's flat shard
    if p == 1:
        return Traffic("sharded", 1, 0, 0, 0.0, 0, 0, 0.0, params)
    gather = ring_bytes("all_gather", shard, p)  # (p - 1) / p of the padded N
    scatter = ring_bytes("reduce_scatter", shard * p, p)
    return Traffic("sharded", p, 1, shard, gather, 3, 2 * shard + shard * p, 2 * gather + scatter, shard)


def compare(config, *, B: int, T: int, p: int, micro_batches: int) -> list[Traffic]:
    """The four schemes at the same p, batch and model: [tensor, data, pipeline, fully sharded data]."""
    return [
        tensor_parallel(config, B=B, T=T, p=p),
        data_parallel(config, B=B, T=T, p=p),
        pipeline_parallel(config, B=B, T=T, p=p, micro_batches=micro_batches),
        fully_sharded(config, B=B, T=T, p=p),
    ]
