"""The tensor-parallel GPT: the dense model's modules and names, with the blocks split over p ranks.

Derived in chapter 4 (`TPMLP`), chapter 5 (`TPCausalSelfAttention`) and chapter 6 (`TPBlock`,
`TPGPT`). Each rank builds its own model from the dense one (`TPGPT.from_dense(dense, group=g)`)
through the plan in `shard.GPT_TP_PLAN`; module and parameter names are the dense model's, so
state dicts line up key by key. Embeddings, layer norms and lm_head are replicated in this version
(chapter 10 swaps in vocabulary-parallel ones: `transformer.wte` and `lm_head` are separate
modules and `loss` a separate method, so they can be overridden).

The communication in forward: exactly two all-reduces per layer (attention's c_proj and the MLP's
c_proj), each of B*T*C numbers, and nothing else. In backward, two more (the f in front of c_attn
and of c_fc).

Dropout must stay off in training mode: replicated dropout needs the same random mask on every
rank, which needs per-rank random-number state (chapter 12).
"""

import threading
from contextlib import contextmanager

import torch
import torch.nn as nn

from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .model import GPTConfig, LayerNorm, causal_attention, check_token_ids, cross_entropy, generate
from .shard import GPT_TP_PLAN, check_shard_state_dict, divide, shard_state_dict


_rng_lock = threading.Lock()


@contextmanager
def _global_rng_restored():
    """Leave the global CPU random-number state as it was, also when p threads build models at once."""
    with _rng_lock:
        state = torch.get_rng_state()
        try:
            yield
        finally:
            torch.set_rng_state(state)


class TPCausalSelfAttention(nn.Module):
    """Attention with the heads split between ranks: rank r computes nh/p whole heads.

    c_attn is column-parallel with stride 3, so a rank holds the q, k and v of its own heads;
    attention over those heads needs nothing from the others; c_proj is row-parallel: its input
    is exactly this rank's heads' outputs, and one all-reduce sums the ranks' contributions.
    """

    def __init__(self, config, *, group):
        super().__init__()
        p = group.world_size
        self.n_head = divide(config.n_head, p, "n_head")  # heads on this rank: nh/p
        self.head_size = config.n_embd // config.n_head  # hs
        C = config.n_embd
        self.c_attn = ColumnParallelLinear(C, 3 * C, group=group, bias=config.bias, stride=3)  # (C) -> (3C/p)
        self.c_proj = RowParallelLinear(C, C, group=group, bias=config.bias)  # (C/p) -> (C), all-reduce
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    @classmethod
    def from_dense(cls, dense, *, group):
        """This rank's heads of a dense `model.CausalSelfAttention` (chapter 5); the global RNG is untouched.

        c_attn's rows are sliced with stride 3 (this rank's heads from each of q, k and v), c_proj's
        weight by columns (its input features are those heads' outputs); c_proj's bias is copied whole.
        """
        config = GPTConfig(n_embd=dense.n_embd, n_head=dense.n_head, bias=dense.c_attn.bias is not None,
                           dropout=dense.dropout)
        with _global_rng_restored():  # the constructor's random init is replaced just below
            module = cls(config, group=group)
        module.c_attn = ColumnParallelLinear.from_dense(dense.c_attn, group=group, stride=3)
        module.c_proj = RowParallelLinear.from_dense(dense.c_proj, group=group)
        return module

    def forward(self, x):
        B, T, C = x.size()  # (B, T, C) replicated
        q, k, v = self.c_attn(x).chunk(3, dim=2)  # each (B, T, C/p) sharded: this rank's heads
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh/p, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh/p, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh/p, T, hs)
        y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, nh/p, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_size)  # (B, T, C/p) sharded
        return self.resid_dropout(self.c_proj(y))  # (B, T, C) replicated, after one all-reduce


class TPMLP(nn.Module):
    """c_fc column-parallel, GELU on each rank's slice, c_proj row-parallel: one all-reduce."""

    def __init__(self, config, *, group):
        super().__init__()
        C = config.n_embd
        self.c_fc = ColumnParallelLinear(C, 4 * C, group=group, bias=config.bias)  # (C) -> (4C/p)
        self.gelu = nn.GELU()
        self.c_proj = RowParallelLinear(4 * C, C, group=group, bias=config.bias)  # (4C/p) -> (C), all-reduce
        self.dropout = nn.Dropout(config.dropout)

    @classmethod
    def from_dense(cls, dense, *, group):
        """This rank's slice of a dense `model.MLP` (chapter 4); the global RNG is untouched.

        c_fc's weight and bias are sliced by output features (4C/p per rank), c_proj's weight by
        input features (the same 4C/p); c_proj's bias is copied whole (it is added once, after the reduce).
        """
        config = GPTConfig(n_embd=dense.c_fc.in_features, n_head=1, bias=dense.c_fc.bias is not None,
                           dropout=dense.dropout.p)
        with _global_rng_restored():  # the constructor's random init is replaced just below
            module = cls(config, group=group)
        module.c_fc = ColumnParallelLinear.from_dense(dense.c_fc, group=group)
        module.c_proj = RowParallelLinear.from_dense(dense.c_proj, group=group)
        return module

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, 4C/p) sharded on the last dim
        x = self.gelu(x)  # (B, T, 4C/p) elementwise, so each rank applies it to its own slice
        x = self.c_proj(x)  # (B, T, C) replicated: the one all-reduce
        return self.dropout(x)


class TPBlock(nn.Module):
    """The dense Block with TP attention and MLP: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config, *, group):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)  # replicated
        self.attn = TPCausalSelfAttention(config, group=group)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)  # replicated
        self.mlp = TPMLP(config, group=group)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # (B, T, C) replicated
        x = x + self.mlp(self.ln_2(x))  # (B, T, C) replicated
        return x


class TPGPT(nn.Module):
    """One rank's GPT: replicated embeddings -> TP blocks -> replicated ln_f and lm_head (tied to wte).

    Build it with `TPGPT.from_dense(dense, group=g)` or `TPGPT.from_shard_state_dict(sd, config,
    group=g)`; the constructor itself allocates parameters it does not initialize meaningfully.
    """

    plan = GPT_TP_PLAN  # how the dense state dict maps onto this model (see shard.py)

    def __init__(self, config, *, group):
        super().__init__()
        divide(config.n_head, group.world_size, "n_head")
        self.config = config
        self.group = group
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([TPBlock(config, group=group) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in the dense model

    @classmethod
    def from_shard_state_dict(cls, state_dict, config, *, group, device=None, dtype=None):
        """This rank's model from its shard; shapes are checked first, with errors naming the parameter."""
        check_shard_state_dict(state_dict, config, group.world_size, rank=group.rank, plan=cls.plan)
        first = next(iter(state_dict.values()))
        with _global_rng_restored():  # the constructors' random init is overwritten below anyway
            model = cls(config, group=group)
        model = model.to(device=device or first.device, dtype=dtype or first.dtype)
        model.load_state_dict(state_dict)
        return model

    @classmethod
    def from_dense(cls, dense, *, group):
        """This rank's slice of a dense GPT: every rank ends up computing what the dense model computes."""
        sd = shard_state_dict(dense.state_dict(), dense.config, group.rank, group.world_size, plan=cls.plan)
        return cls.from_shard_state_dict(sd, dense.config, group=group)

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) -> (logits (B, T, V) replicated, loss or None), like the dense GPT."""
        if self.training and self.config.dropout > 0:
            raise ValueError(f"dropout={self.config.dropout} in training mode is not supported under tensor "
                             f"parallelism yet (ranks would draw different masks): use model.eval() or dropout=0.0")
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {T}: block_size is only "
                             f"{self.config.block_size}; crop the input or raise block_size")
        if not isinstance(self.transformer.wte, VocabParallelEmbedding):  # that one checks the ids itself
            check_token_ids(idx, self.config.vocab_size)
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C) replicated
        for block in self.transformer.h:
            x = block(x)  # (B, T, C) replicated; two all-reduces inside
        x = self.transformer.ln_f(x)  # (B, T, C) replicated
        logits = self.lm_head(x)  # (B, T, V) replicated, computed on every rank
        loss = None if targets is None else self.loss(logits, targets)
        return logits, loss

    def loss(self, logits, targets):
        """Mean cross-entropy (every rank holds the full logits here; chapter 10 shards them)."""
        return cross_entropy(logits, targets)

    def generate(self, idx, max_new_tokens, *, temperature=1.0, top_k=None, greedy=True, generator=None):
        """Exactly the dense GPT's generate; every rank must call it (each step communicates)."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                        greedy=greedy, generator=generator)
