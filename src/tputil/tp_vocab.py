"""The tensor-parallel GPT with its vocabulary split too: embedding, head and loss (chapter 10).

At GPT-2 size the tied wte/lm_head matrix (V x C = 50304 x 768) is the largest single tensor,
and `tp_model.TPGPT` with its replicated head stores all of it on every rank and computes the
whole head. `VocabParallelTPGPT` is `TPGPT(..., vocab_parallel=True)`: the tied matrix split
over the vocabulary, keeping nanoGPT's weight tying (one parameter of shape (V_pad/p, C) per
rank serves both):

- `transformer.wte`: a `layers.VocabParallelEmbedding`, one all-reduce of B*T*C numbers;
- the blocks as with the replicated head, two all-reduces of B*T*C per layer;
- `lm_head`: a `layers.ColumnParallelLinear` over the padded vocabulary, no gather: logits
  (B, T, V_pad/p) sharded on the last dim (backward: one all-reduce of dL/dx, the head's f);
- the loss: `loss.vocab_parallel_cross_entropy`, three all-reduces of B*T numbers.

Forward with targets: 2 n_layer + 4 all-reduces, and the full logits are never built. Greedy
generation takes `loss.vocab_parallel_argmax` (two more all-reduces of B numbers per token).
Vocabulary padding (`shard.pad_vocab_size`) and its plan (`shard.vocab_parallel_plan`) make any
V work for any p; the padded ids are masked out of the loss and the argmax.
"""

from .shard import GPT_TP_PLAN, GPT_VOCAB_TP_PLAN, shard_shapes, vocab_parallel_plan
from .tp_model import TPGPT


class VocabParallelTPGPT(TPGPT):
    """`TPGPT` with vocab_parallel=True: the name chapter 10 teaches. Only the defaults differ.

    `multiple`: the vocabulary is padded to a multiple of multiple * p (see `shard.pad_vocab_size`;
    1 pads least, Megatron-LM uses 128). forward returns the logit shard (B, T, V_pad/p);
    `gather_logits` turns it into the dense model's (B, T, V) when needed.
    """

    plan = GPT_VOCAB_TP_PLAN  # the plan for the default multiple=1; instances use their own multiple's

    def __init__(self, config, *, group, multiple: int = 1):
        super().__init__(config, group=group, vocab_parallel=True, multiple=multiple)


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
