"""The tensor-parallel GPT: the dense model's modules and names, with the blocks split over p ranks.

Derived in chapter 4 (`TPMLP`), chapter 5 (`TPCausalSelfAttention`), chapter 6 (`TPBlock`,
`TPGPT`) and chapter 10 (the vocabulary-parallel head, `TPGPT(..., vocab_parallel=True)`). One
class, `TPGPT`, whose options choose the variant; module and parameter names are the dense
model's, so state dicts line up key by key, and `shard.GPT_TP_PLAN` (or its vocabulary-parallel
version) says how each dense tensor is split.

Building: `TPGPT.from_dense(dense, group=g)` or `TPGPT.from_shard_state_dict(sd, config, group=g)`
(and `from_dense` of `TPMLP` and `TPCausalSelfAttention`) build the modules on the `meta` device,
which draws no random numbers and allocates nothing, then load this rank's shard by the plan
(`layers.materialize`). The constructors themselves draw random weights, as `nn.Linear` does.

The communication in forward, replicated head: exactly two all-reduces per layer (attention's
c_proj and the MLP's c_proj), each of B*T*C numbers, and nothing else; in backward, two more
(the f in front of c_attn and of c_fc). The vocabulary-parallel head adds one all-reduce of
B*T*C (the embedding) and, with targets, three of B*T (the loss); backward one of B*T*C (the
head's f).

Sequence parallelism (chapter 11, `TPGPT(..., sequence_parallel=True)`; Korthikanti et al. 2022):
outside the blocks' tensor-parallel regions (norms, residual adds) the activations are split along
T, (B, T/p, C); each all-reduce becomes a reduce-scatter (row-parallel output) and an all-gather
(column-parallel input). T is padded at the end to a multiple of p (causal attention keeps the
padding out of every real token; its logits are dropped). The gradients of the parameters used on
own tokens only (norms, row-parallel biases, and wpe with the vocabulary-parallel head) are partial
sums: `all_reduce_sequence_parallel_grads()` after backward sums them.

Dropout (chapter 12): every site is an `rng.Dropout` drawing from the model's `rng.RNGTracker`
(`TPGPT(..., rng_seed=s)`): the embedding and residual dropouts (replicated) the same mask on every
rank, the attention weights of a rank's own heads (and, with sequence parallelism, its own tokens)
masks independent across ranks. `rng.recording` / `rng.assemble_masks` give the dense model the
masks the ranks drew, and it then computes what they computed.
"""

import torch
import torch.nn as nn

from .comm import (
    gather_from_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, materialize
from .loss import vocab_parallel_argmax, vocab_parallel_cross_entropy
from .model import LayerNorm, causal_attention, check_token_ids, cross_entropy, generate
from .rng import Dropout, RNGTracker, dropout_sites, use_rng
from .shard import (
    GPT_TP_PLAN,
    GPT_VOCAB_TP_PLAN,
    check_shard_state_dict,
    divide,
    local_shard,
    pad_vocab_size,
    placement,
    shard_shapes,
    shard_state_dict,
    vocab_parallel_plan,
)


def _from_dense(cls, dense, group):
    """A `cls` (TPMLP or TPCausalSelfAttention) holding this rank's shard of `dense`, by GPT_TP_PLAN."""
    with torch.device("meta"):
        module = cls(dense.config, group=group)  # shapes only: nothing drawn, nothing allocated
    shard = {
        name: local_shard(t, placement(cls.path + name), group.rank, group.world_size)
        for name, t in dense.state_dict().items()
    }
    w = next(dense.parameters())
    return materialize(module, shard, device=w.device, dtype=w.dtype)


class TPCausalSelfAttention(nn.Module):
    """Attention with the heads split between ranks: rank r computes nh/p whole heads.

    c_attn is column-parallel, split as the plan says (per head within each of q, k and v), so a
    rank holds the q, k and v of its own heads; attention over those heads needs nothing from the
    others; c_proj is row-parallel: its input is exactly this rank's heads' outputs, and one
    all-reduce sums the ranks' contributions. (B, T, C) replicated -> (B, T, C) replicated.
    """

    path = "transformer.h.0.attn."  # where the dense GPT names its parameters (every layer is placed alike)

    def __init__(self, config, *, group):
        super().__init__()
        self.n_head = divide(config.n_head, group.world_size, "n_head")  # heads on this rank: nh/p
        self.head_size = config.head_size  # hs
        C = config.n_embd
        qkv = placement(self.path + "c_attn.weight")  # the plan's split of the stacked q, k and v
        self.c_attn = ColumnParallelLinear(C, 3 * C, group=group, bias=config.bias, stride=qkv.stride)  # (C) -> (3C/p)
        self.c_proj = RowParallelLinear(C, C, group=group, bias=config.bias)  # (C/p) -> (C), all-reduce
        self.attn_dropout = Dropout(config.dropout, region="tensor")  # this rank's heads: its own masks
        self.resid_dropout = Dropout(config.dropout)  # replicated: the same mask on every rank
        self.dropout = config.dropout

    @classmethod
    def from_dense(cls, dense, *, group):
        """This rank's heads of a dense `model.CausalSelfAttention` (chapter 5), by the plan; nothing drawn.

        c_attn's weight and bias: this rank's heads from each of q, k and v; c_proj's weight: the
        columns of those heads' outputs; c_proj's bias whole. On dense's device, in its dtype.
        """
        return _from_dense(cls, dense, group)

    def forward(self, x, kv=None):
        """kv: this layer's `kv_cache.LayerKV` (chapter 13): this rank caches its own heads, (B, nh/p, T, hs)."""
        qkv = self.c_attn(x)  # (B, T, 3C/p); a sequence-parallel x (B, T/p, C) is all-gathered along T inside
        B, T, _ = qkv.size()
        q, k, v = qkv.split(self.n_head * self.head_size, dim=2)  # each (B, T, C/p): this rank's heads
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh/p, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh/p, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh/p, T, hs)
        if kv is not None:
            k, v = kv.append(k, v)  # (B, nh/p, T_cached + T, hs): this rank's heads only
        y = causal_attention(q, k, v, dropout=self.attn_dropout)  # (B, nh/p, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_size)  # (B, T, C/p) sharded
        return self.resid_dropout(self.c_proj(y))  # (B, T, C) replicated, after one all-reduce


class TPMLP(nn.Module):
    """c_fc column-parallel, GELU on each rank's slice, c_proj row-parallel: one all-reduce.

    (B, T, C) replicated -> (B, T, 4C/p) sharded -> (B, T, C) replicated.
    """

    path = "transformer.h.0.mlp."  # where the dense GPT names its parameters (every layer is placed alike)

    def __init__(self, config, *, group):
        super().__init__()
        C = config.n_embd
        self.c_fc = ColumnParallelLinear(C, 4 * C, group=group, bias=config.bias)  # (C) -> (4C/p)
        self.gelu = nn.GELU(approximate=config.gelu)  # erf, or GPT-2's tanh (chapter 16)
        self.c_proj = RowParallelLinear(4 * C, C, group=group, bias=config.bias)  # (4C/p) -> (C), all-reduce
        self.dropout = Dropout(config.dropout)  # replicated: the same mask on every rank

    @classmethod
    def from_dense(cls, dense, *, group):
        """This rank's slice of a dense `model.MLP` (chapter 4), by the plan; nothing drawn.

        c_fc's weight and bias: 4C/p output features; c_proj's weight: the same 4C/p input
        features; c_proj's bias whole (added once, after the reduce). On dense's device, in its dtype.
        """
        return _from_dense(cls, dense, group)

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

    def forward(self, x, kv=None):
        x = x + self.attn(self.ln_1(x), kv)  # (B, T, C) replicated
        x = x + self.mlp(self.ln_2(x))  # (B, T, C) replicated
        return x


class TPGPT(nn.Module):
    """One rank's GPT: embeddings -> TP blocks -> ln_f -> head (tied to wte). Options choose the head.

    vocab_parallel=False (chapter 6): wte and lm_head replicated, logits (B, T, V) on every rank.
    vocab_parallel=True (chapter 10; Megatron-LM's parallel_output): the tied wte/lm_head split
    over the vocabulary, padded to V_pad, a multiple of `multiple` * p (`shard.pad_vocab_size`;
    1 pads least, Megatron-LM uses 128): wte a `VocabParallelEmbedding`, lm_head a
    `ColumnParallelLinear` without gather, logits (B, T, V_pad/p), this rank's ids
    [vocab_start, vocab_end); the loss and the greedy argmax are computed from the shards.

    async_grad_all_reduce=True sets that option on every column-parallel layer (c_attn, c_fc and,
    vocab-parallel, lm_head; see `layers.ColumnParallelLinear`): their backward overlaps the
    all-reduce of dL/dX with the weight gradients. The same results and collectives, as calls.

    sequence_parallel=True (chapter 11): the activations between the tensor-parallel regions split
    along T (see the module docstring); every column- and row-parallel layer and the
    vocabulary-parallel embedding get sequence_parallel=True. Training must call
    `all_reduce_sequence_parallel_grads()` after backward. Not with async_grad_all_reduce.

    rng_seed (chapter 12): seeds `self.rng`, an `rng.RNGTracker` for this rank that every dropout
    site draws from: the replicated sites with rng_seed on every rank, the attention weights (and
    with sequence_parallel the sites on own tokens) with rng_seed + 2718 + rank.
    `rng.use_rng(model, tracker)` swaps it.

    Build it with `from_dense` or `from_shard_state_dict`; the constructor draws random weights
    that mean nothing. `plan`: how the dense state dict maps onto this model (see shard.py).
    """

    plan = GPT_TP_PLAN  # for the replicated head; an instance with vocab_parallel=True has its own

    def __init__(
        self,
        config,
        *,
        group,
        vocab_parallel: bool = False,
        multiple: int = 1,
        async_grad_all_reduce: bool = False,
        sequence_parallel: bool = False,
        rng_seed: int = 0,
    ):
        super().__init__()
        p, V, C = group.world_size, config.vocab_size, config.n_embd
        divide(config.n_head, p, "n_head")
        if sequence_parallel and async_grad_all_reduce:
            raise ValueError(
                "sequence_parallel replaces the all-reduce of dL/dX that async_grad_all_reduce overlaps "
                "by a reduce-scatter: pass only one of them"
            )
        if multiple != 1 and not vocab_parallel:
            raise ValueError(
                f"multiple={multiple} pads the vocabulary of the vocabulary-parallel head: "
                f"pass vocab_parallel=True, or leave multiple=1"
            )
        self.config = config
        self.group = group
        self.vocab_parallel = vocab_parallel
        self.multiple = multiple
        if vocab_parallel:
            self.plan = vocab_parallel_plan(multiple)
            self.padded_vocab_size = pad_vocab_size(V, p, multiple=multiple)  # V_pad
            wte = VocabParallelEmbedding(V, C, group=group, padded_vocab_size=self.padded_vocab_size)  # (V_pad/p, C)
        else:
            self.padded_vocab_size = V
            wte = nn.Embedding(V, C)  # replicated
        self.transformer = nn.ModuleDict(
            dict(
                wte=wte,
                wpe=nn.Embedding(config.block_size, C),  # replicated
                drop=Dropout(config.dropout),  # replicated: the same mask on every rank
                h=nn.ModuleList([TPBlock(config, group=group) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(C, bias=config.bias),  # replicated
            )
        )
        if vocab_parallel:
            self.lm_head = ColumnParallelLinear(C, self.padded_vocab_size, group=group, bias=False)  # (C) -> (V_pad/p)
        else:
            self.lm_head = nn.Linear(C, V, bias=False)  # (C) -> (V) replicated
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor, two names
        self.async_grad_all_reduce = async_grad_all_reduce
        self.sequence_parallel = sequence_parallel
        for module in self.modules():
            if isinstance(module, ColumnParallelLinear):
                module.async_grad_all_reduce = async_grad_all_reduce
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
                module.sequence_parallel = sequence_parallel
        for site in dropout_sites(self).values():  # chapter 12: which random state each dropout draws from
            if sequence_parallel and site.region == "replicated":
                site.region = "sequence"  # it acts on this rank's own tokens (B, T/p, C)
        use_rng(self, RNGTracker(rng_seed, rank=group.rank))  # self.rng

    @classmethod
    def from_shard_state_dict(cls, state_dict, config, *, group, device=None, dtype=None, **options):
        """This rank's model from its shard; shapes are checked first, with errors naming the parameter.

        options: the constructor's (vocab_parallel, multiple, async_grad_all_reduce, sequence_parallel).
        device and dtype default to the shard's.
        """
        with torch.device("meta"):
            model = cls(config, group=group, **options)  # shapes only: nothing drawn, nothing allocated
        return model._load(state_dict, device=device, dtype=dtype)

    @classmethod
    def from_dense(cls, dense, *, group, **options):
        """This rank's slice of a dense GPT, by the plan: every rank ends up computing what the dense model computes."""
        with torch.device("meta"):
            model = cls(dense.config, group=group, **options)  # shapes only: nothing drawn, nothing allocated
        return model._load(
            shard_state_dict(dense.state_dict(), dense.config, group.rank, group.world_size, plan=model.plan)
        )

    def _load(self, state_dict, *, device=None, dtype=None):
        """This model, built on the meta device, given storage and loaded with its shard: the one way to load."""
        check_shard_state_dict(state_dict, self.config, self.group.world_size, rank=self.group.rank, plan=self.plan)
        first = next(iter(state_dict.values()))
        return materialize(self, state_dict, device=device or first.device, dtype=dtype or first.dtype)

    @property
    def vocab_start(self) -> int:
        """The first token id whose logit this rank computes (0 for the replicated head)."""
        return self.transformer.wte.vocab_start if self.vocab_parallel else 0

    @property
    def vocab_end(self) -> int:
        """One past the last token id whose logit this rank computes (V_pad/p ids; V for the replicated head)."""
        return self.transformer.wte.vocab_end if self.vocab_parallel else self.config.vocab_size

    def forward(self, idx, targets=None, *, kv_cache=None):
        """idx, targets: (B, T) -> (logits, loss or None); the loss is the dense model's, on every rank.

        logits: (B, T, V) replicated, or with vocab_parallel this rank's shard (B, T, V_pad/p),
        the logits of ids [vocab_start, vocab_end), never gathered (see `gather_logits`).
        kv_cache: a `kv_cache.KVCache` of this rank's heads, or None, as in `model.GPT.forward` (chapter 13).
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of length {T}: block_size is only "
                f"{self.config.block_size}; crop the input or raise block_size"
            )
        if kv_cache is not None and self.sequence_parallel:
            raise ValueError(
                "a KV cache decodes one new position per step, which sequence parallelism cannot split "
                "along T: generate with a model built without sequence_parallel (the same weights)"
            )
        heads = self.config.n_head // self.group.world_size  # nh/p: the heads this rank caches
        start = 0 if kv_cache is None else kv_cache.check(B, T, self.config, heads)
        if not isinstance(self.transformer.wte, VocabParallelEmbedding):  # that one checks the ids itself
            check_token_ids(idx, self.config.vocab_size)
        if self.sequence_parallel:
            logits = self._sequence_parallel_logits(idx)  # chapter 11: the same logits, other collectives
        else:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,) after the cached ones
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C) replicated
            kvs = [None] * self.config.n_layer if kv_cache is None else kv_cache.layers
            for block, kv in zip(self.transformer.h, kvs):
                x = block(x, kv)  # (B, T, C) replicated; two all-reduces inside
            x = self.transformer.ln_f(x)  # (B, T, C) replicated
            logits = self.lm_head(x)  # (B, T, V) replicated, or (B, T, V_pad/p) sharded
        loss = None if targets is None else self.loss(logits, targets)
        return logits, loss

    def _sequence_parallel_logits(self, idx):
        """forward's body under sequence parallelism (chapter 11): idx (B, T) -> the same logits as forward's.

        T is padded at the end to T' = p * ceil(T/p) (token 0 at position 0: causal attention keeps
        a pad after the last real token out of every real one, and its logits are dropped).
        """
        p, r, T = self.group.world_size, self.group.rank, idx.size(1)
        pad = -T % p
        idx = nn.functional.pad(idx, (0, pad))  # (B, T')
        pos = nn.functional.pad(torch.arange(0, T, dtype=torch.long, device=idx.device), (0, pad))  # (T',)
        if self.vocab_parallel:  # partial rows reduce-scattered along T; wpe on own positions
            x = self.transformer.wte(idx) + self.transformer.wpe(pos.chunk(p)[r])  # (B, T'/p, C)
        else:  # computed whole, each rank keeps its T'/p tokens
            x = scatter_to_sequence_parallel_region(self.transformer.wte(idx) + self.transformer.wpe(pos), self.group)
        x = self.transformer.drop(x)  # (B, T'/p, C) split along T
        for block in self.transformer.h:
            x = block(x)  # (B, T'/p, C); in each: all-gather -> TP region -> reduce-scatter, twice
        x = self.transformer.ln_f(x)  # (B, T'/p, C) own tokens
        if not self.vocab_parallel:  # the replicated head reads every token; backward: keep own chunk
            x = gather_from_sequence_parallel_region(x, self.group, tensor_parallel_output_grad=False)  # (B, T', C)
        logits = self.lm_head(x)  # (B, T', V) or (B, T', V_pad/p); column-parallel all-gathers along T
        return logits[:, :T]  # the pads' logits dropped

    def sequence_parallel_parameters(self) -> dict:
        """{name: parameter} whose gradient is a partial sum under sequence parallelism ({} without it).

        The parameters used on this rank's tokens only: ln_1, ln_2, ln_f, the row-parallel biases
        (c_proj), and wpe with the vocabulary-parallel head (added on own positions). Replicated,
        so each rank's gradient is its tokens' share: the exception to chapter 9's rule.
        """
        if not self.sequence_parallel or self.group.world_size == 1:
            return {}
        own_tokens = (".ln_1.", ".ln_2.", "transformer.ln_f.", ".c_proj.bias") + (
            ("transformer.wpe.",) if self.vocab_parallel else ()
        )
        return {n: w for n, w in self.named_parameters() if any(k in "." + n for k in own_tokens)}

    def all_reduce_sequence_parallel_grads(self):
        """Sum the partial gradients of `sequence_parallel_parameters()` over ranks: one all-reduce, flattened.

        Call it after backward, before the optimizer step, on every rank (train.train does). Without
        sequence parallelism (or at p = 1) nothing to sum: no call. Returns the names summed.
        """
        params = {n: w for n, w in self.sequence_parallel_parameters().items() if w.grad is not None}
        if params:
            grads = [w.grad for w in params.values()]
            flat = self.group.all_reduce(torch.cat([g.reshape(-1) for g in grads]), tag="sequence_parallel_grads")
            for g, total in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(total.view_as(g))
        return list(params)

    def loss(self, logits, targets):
        """Mean cross-entropy of the logits against targets (B, T); targets of -1 are ignored.

        From the shards with vocab_parallel: three all-reduces of B*T numbers, padding masked.
        """
        if not self.vocab_parallel:
            return cross_entropy(logits, targets)
        return vocab_parallel_cross_entropy(
            logits, targets, group=self.group, vocab_start=self.vocab_start, vocab_size=self.config.vocab_size
        )

    def argmax(self, logits):
        """(..., V) or, with vocab_parallel, the shards (..., V_pad/p) -> (...) the id of the largest logit.

        From the shards: `loss.vocab_parallel_argmax`, two all-reduces of B*T numbers, padding never chosen.
        """
        if not self.vocab_parallel:
            return logits.argmax(dim=-1)
        return vocab_parallel_argmax(
            logits, group=self.group, vocab_start=self.vocab_start, vocab_size=self.config.vocab_size
        )

    def gather_logits(self, logits):
        """The full logits (..., V): the logits themselves, or from the shards (..., V_pad/p) one all-gather.

        Padding dropped; differentiable.
        """
        if not self.vocab_parallel:
            return logits
        return gather_from_parallel_region(logits, self.group)[..., : self.config.vocab_size]

    def generate(self, idx, max_new_tokens, *, kv_cache=None, **options):
        """The dense GPT's generate (`model.generate`); every rank must call it (each step communicates).

        With vocab_parallel, greedy takes `argmax` of the last position's shards (two all-reduces
        of B numbers per token on top of the forward); sampling all-gathers them, (B, V_pad/p) per
        rank: give every rank a generator in the same state, or the ranks draw different tokens.
        kv_cache=True (chapter 13): each rank caches its own heads; a new token then costs two
        all-reduces of B*1*C per layer (plus the vocabulary-parallel head's). kv_cache=None (the
        default) means True, except with sequence_parallel, where one new position cannot be split
        along T and the whole window is recomputed instead (kv_cache=True is then refused).
        """
        if kv_cache is None:
            kv_cache = not self.sequence_parallel
        return generate(
            self,
            idx,
            max_new_tokens,
            argmax=self.argmax,
            gather_logits=self.gather_logits,
            kv_cache=kv_cache,
            **options,
        )


class VocabParallelTPGPT(TPGPT):
    """`TPGPT` with vocab_parallel=True: the name chapter 10 teaches. Only the defaults differ.

    `multiple`: the vocabulary is padded to a multiple of multiple * p (see `shard.pad_vocab_size`;
    1 pads least, Megatron-LM uses 128). forward returns the logit shard (B, T, V_pad/p);
    `gather_logits` turns it into the dense model's (B, T, V) when needed.
    """

    plan = GPT_VOCAB_TP_PLAN  # the plan for the default multiple=1; instances use their own multiple's

    def __init__(
        self,
        config,
        *,
        group,
        multiple: int = 1,
        async_grad_all_reduce: bool = False,
        sequence_parallel: bool = False,
        rng_seed: int = 0,
    ):
        super().__init__(
            config,
            group=group,
            vocab_parallel=True,
            multiple=multiple,
            async_grad_all_reduce=async_grad_all_reduce,
            sequence_parallel=sequence_parallel,
            rng_seed=rng_seed,
        )


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
    return {
        "dense": count(shard_shapes(config, 1, plan=GPT_TP_PLAN)),
        "replicated_head": replicated,
        "vocab_parallel": vocab,
        "saved": replicated - vocab,
    }
