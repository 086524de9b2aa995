"""The tensor-parallel GPT with its vocabulary split too: embedding, head and loss (chapter 10).

At GPT-2 size the tied wte/lm_head matrix (V x C = 50304 x 768) is the largest single tensor,
and `tp_model.TPGPT` replicates it: every rank stores all of it and computes the whole head.
`VocabParallelTPGPT` splits it over the vocabulary, keeping nanoGPT's weight tying (one
parameter of shape (V_pad/p, C) per rank serves both):

- `transformer.wte`: a `layers.VocabParallelEmbedding`, one all-reduce of B*T*C numbers;
- the blocks as in `TPGPT`, two all-reduces of B*T*C per layer;
- `lm_head`: a `layers.ColumnParallelLinear` over the padded vocabulary, no gather: logits
  (B, T, V_pad/p) sharded on the last dim (backward: one all-reduce of dL/dx, the head's f);
- the loss: `loss.vocab_parallel_cross_entropy`, three all-reduces of B*T numbers.

Forward with targets: 2 n_layer + 4 all-reduces, and the full logits are never built. Greedy
generation takes `loss.vocab_parallel_argmax` (two more all-reduces of B numbers per token).
Vocabulary padding (`shard.pad_vocab_size`) and its plan (`shard.vocab_parallel_plan`) make any
V work for any p; the padded ids are masked out of the loss and the argmax.

Simplification: the constructor briefly builds `TPGPT`'s replicated (V, C) embedding before
swapping in the sharded one (it is garbage at once); a production model would not allocate it.
"""

import torch

from .comm import gather_from_parallel_region
from .layers import ColumnParallelLinear, VocabParallelEmbedding
from .loss import vocab_parallel_argmax, vocab_parallel_cross_entropy
from .model import check_prompt, generate
from .shard import (GPT_TP_PLAN, GPT_VOCAB_TP_PLAN, check_shard_state_dict, pad_vocab_size, shard_shapes, shard_state_dict,
                    vocab_parallel_plan)
from .tp_model import TPGPT, _global_rng_restored


class VocabParallelTPGPT(TPGPT):
    """One rank's GPT with the tied embedding/head split over the (padded) vocabulary.

    Build it with `VocabParallelTPGPT.from_dense(dense, group=g)` or `from_shard_state_dict`.
    `multiple`: the vocabulary is padded to a multiple of multiple * p (see `shard.pad_vocab_size`;
    1 pads least, Megatron-LM uses 128). forward returns the logit shard (B, T, V_pad/p);
    `gather_logits` turns it into the dense model's (B, T, V) when needed.
    """

    plan = GPT_VOCAB_TP_PLAN  # the plan for the default multiple=1; instances use their own multiple's

    def __init__(self, config, *, group, multiple: int = 1):
        super().__init__(config, group=group)
        V, C = config.vocab_size, config.n_embd
        self.multiple = multiple
        self.plan = vocab_parallel_plan(multiple)  # shadows TPGPT.plan, for this instance
        self.padded_vocab_size = pad_vocab_size(V, group.world_size, multiple=multiple)  # V_pad
        self.transformer.wte = VocabParallelEmbedding(V, C, group=group, padded_vocab_size=self.padded_vocab_size)
        self.lm_head = ColumnParallelLinear(C, self.padded_vocab_size, group=group, bias=False)  # (C) -> (V_pad/p)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one (V_pad/p, C) tensor, two names

    @property
    def vocab_start(self) -> int:
        return self.transformer.wte.vocab_start

    @property
    def vocab_end(self) -> int:
        return self.transformer.wte.vocab_end

    @classmethod
    def from_shard_state_dict(cls, state_dict, config, *, group, multiple: int = 1, device=None, dtype=None):
        """This rank's model from its shard (made by `shard.vocab_parallel_plan(multiple)`); shapes checked first."""
        plan = vocab_parallel_plan(multiple)
        check_shard_state_dict(state_dict, config, group.world_size, rank=group.rank, plan=plan)
        first = next(iter(state_dict.values()))
        with _global_rng_restored():  # the constructors' random init is overwritten below anyway
            model = cls(config, group=group, multiple=multiple)
        model = model.to(device=device or first.device, dtype=dtype or first.dtype)
        model.load_state_dict(state_dict)
        return model

    @classmethod
    def from_dense(cls, dense, *, group, multiple: int = 1):
        """This rank's slice of a dense GPT, the tied wte/lm_head split over the padded vocabulary."""
        sd = shard_state_dict(dense.state_dict(), dense.config, group.rank, group.world_size,
                              plan=vocab_parallel_plan(multiple))
        return cls.from_shard_state_dict(sd, dense.config, group=group, multiple=multiple)

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) -> (logits (B, T, V_pad/p) sharded on the last dim, loss or None).

        Rank r's logits are those of ids [vocab_start, vocab_end); the loss (replicated) is the
        dense model's, computed without gathering them.
        """
        return super().forward(idx, targets)

    def loss(self, logits, targets):
        """Mean cross-entropy from the logit shards: three all-reduces of B*T numbers, padding masked."""
        return vocab_parallel_cross_entropy(logits, targets, group=self.group, vocab_start=self.vocab_start,
                                            vocab_size=self.config.vocab_size)

    def gather_logits(self, logits):
        """The full logits (..., V) from the shards (..., V_pad/p): one all-gather, padding dropped. Differentiable."""
        return gather_from_parallel_region(logits, self.group)[..., :self.config.vocab_size]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, *, temperature=1.0, top_k=None, greedy=True, generator=None):
        """The dense GPT's generate; every rank must call it (each step communicates).

        greedy: `vocab_parallel_argmax` of the last position's logit shards, two all-reduces of B
        numbers per token on top of the forward. Sampling needs the whole distribution: the last
        position's logits are all-gathered, (B, V_pad/p) per rank; give every rank a generator in
        the same state, or the ranks draw different tokens.
        """
        check_prompt(idx)  # before any communication, on every rank
        if not greedy:
            return generate(_LastLogitsGathered(self), idx, max_new_tokens, temperature=temperature,
                            top_k=top_k, greedy=False, generator=generator)
        block_size = self.config.block_size
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]  # (B, <= block_size)
            logits, _ = self(idx_cond)  # (B, T, V_pad/p)
            idx_next = vocab_parallel_argmax(logits[:, -1, :], group=self.group, vocab_start=self.vocab_start,
                                             vocab_size=self.config.vocab_size)  # (B,) the same on every rank
            idx = torch.cat((idx, idx_next.unsqueeze(1)), dim=1)
        return idx


class _LastLogitsGathered:
    """What `model.generate` calls: idx -> (the last position's full logits (B, 1, V), None)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def __call__(self, idx):
        logits, _ = self.model(idx)
        return self.model.gather_logits(logits[:, -1:, :]), None


def param_counts_per_rank(config, p: int, *, multiple: int = 1) -> dict:
    """Parameters one rank stores, from the shapes alone (nothing is built); the tied wte/lm_head counted once.

    Returns {"dense": the dense GPT, "replicated_head": a rank of `TPGPT` (blocks split, wte/lm_head
    whole), "vocab_parallel": a rank of `VocabParallelTPGPT`, "saved": the difference, about
    V * C * (p - 1) / p (more exactly V_pad * C / p replaces V * C)}.
    """

    def count(shapes):
        return sum(s.numel() for name, s in shapes.items() if name != "lm_head.weight")  # tied: wte's tensor

    replicated = count(shard_shapes(config, p, plan=GPT_TP_PLAN))
    vocab = count(shard_shapes(config, p, plan=vocab_parallel_plan(multiple)))
    return {"dense": count(shard_shapes(config, 1, plan=GPT_TP_PLAN)), "replicated_head": replicated,
            "vocab_parallel": vocab, "saved": replicated - vocab}
