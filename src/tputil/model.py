"""The dense GPT: the reference every tensor-parallel version is checked against.

Used from chapter 6 (the whole GPT) on; chapters 4 and 5 take its `MLP` and `CausalSelfAttention`
apart. Our own code with nanoGPT's architecture and module names (`wte, wpe, h, ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f, lm_head`), so the dense and the parallel model line
up name by name. Built bottom-up: LayerNorm -> attention -> MLP -> Block -> GPTConfig -> GPT.

Two differences from nanoGPT, both for the course's equality checks: `forward` always returns the
logits of every position, and `generate` decodes greedily (argmax) unless asked to sample.
`generate` keeps the keys and values in a `kv_cache.KVCache` (chapter 13) unless told not to.

Shape glossary: B batch, T time (sequence length), C channels (n_embd), nh heads, hs head size
(C // nh), V vocab_size.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from .kv_cache import KVCache
from .rng import Dropout


class LayerNorm(nn.Module):
    """LayerNorm over the last dim (C), with an optional bias (GPT-2 has one)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def causal_attention(q, k, v, *, dropout_p: float = 0.0, dropout=None):
    """softmax(q k^T / sqrt(hs), each position masked to itself and the past) v, per head.

    q, k, v: (B, nh, T, hs) -> (B, nh, T, hs); nh may be a rank's share of the heads (the
    tensor-parallel attention calls it too): heads never mix. Written out, with no fused kernel,
    so it runs in any dtype, float64 included. dropout_p: dropout on the attention weights.
    With a KV cache (chapter 13) k and v hold Tk >= Tq positions and the Tq queries are the last
    Tq of them: query i sits at position Tk - Tq + i, and sees keys 0 to Tk - Tq + i.
    """
    Tq, Tk = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, Tq, Tk)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)  # (Tq, Tk) True up to the query
    att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    if dropout is not None:  # a module such as `Dropout` (the attention modules pass theirs, chapter 12)
        att = dropout(att)  # (B, nh, Tq, Tk)
    elif dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: x (B, T, C) -> (B, T, C), with nh = n_head heads of hs = C // nh."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # kept, so that a tensor-parallel copy can be built from it (tp_model)
        # q, k and v of all heads in one matmul, stacked in that order along the output features
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = Dropout(config.dropout, region="tensor")  # on the attention weights, per head
        self.resid_dropout = Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, kv=None):
        """kv: this layer's `kv_cache.LayerKV` of a KV cache, or None; with it, x holds the new positions only."""
        B, T, C = x.size()  # (B, T, C)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv is not None:
            k, v = kv.append(k, v)  # (B, nh, T_cached + T, hs)
        y = causal_attention(q, k, v, dropout=self.attn_dropout)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C) the heads side by side again
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """c_proj(GELU(c_fc(x))): x (B, T, C) -> (B, T, C) through 4C hidden features."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # kept, so that a tensor-parallel copy can be built from it (tp_model)
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, 4C)
        x = self.gelu(x)  # (B, T, 4C)
        x = self.c_proj(x)  # (B, T, C)
        return self.dropout(x)


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv=None):
        x = x + self.attn(self.ln_1(x), kv)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


@dataclass
class GPTConfig:
    block_size: int = 64  # the longest context; short enough that attention's T x T is cheap on a CPU
    vocab_size: int = 256  # one token per byte: any text, no tokenizer; divisible by every p up to 256
    n_layer: int = 4  # enough layers that "2 all-reduces per layer" is a count, not a coincidence
    n_head: int = 4  # the tensor-parallel degree p must divide it (heads are split between ranks)
    n_embd: int = 64  # C; n_head * head size, so 16 channels per head by default
    dropout: float = 0.0  # off: equality checks need determinism (TP draws its masks per rank: chapter 12)
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2 (and they test the "add once" rule)
    gelu: str = "none"  # nn.GELU's approximate=: "none" the exact erf GELU, "tanh" GPT-2's (chapter 16)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name}={value!r}: it must be a positive integer")
        if self.n_embd % self.n_head != 0:
            fits = [self.n_head * (self.n_embd // self.n_head), self.n_head * (self.n_embd // self.n_head + 1)]
            fits = [c for c in fits if c > 0]
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: every head gets "
                f"n_embd // n_head channels; choose n_embd as a multiple of n_head (e.g. {fits}) "
                f"or n_head dividing n_embd"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r}: it must be in [0, 1)")
        if self.gelu not in ("none", "tanh"):
            raise ValueError(f"GPTConfig.gelu={self.gelu!r}: it must be 'none' (erf) or 'tanh' (GPT-2's approximation)")

    def __repr__(self):  # the default GELU is left out, so configs print as before chapter 16
        shown = [f.name for f in fields(self) if f.name != "gelu" or self.gelu != "none"]
        return f"GPTConfig({', '.join(f'{name}={getattr(self, name)!r}' for name in shown)})"

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head  # hs


def check_token_ids(idx, vocab_size: int):
    """Raise an IndexError naming the range if any id in idx is not a token id in [0, vocab_size).

    Every model (dense, tensor-parallel, vocabulary-parallel) calls it first, before any
    communication. Costs one min and one max over idx (one transfer from a GPU).
    """
    if idx.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(idx)).tolist()
    if low < 0 or high >= vocab_size:
        raise IndexError(f"token ids must be in [0, {vocab_size}), got ids in [{low}, {high}]")


def check_prompt(idx):
    """Raise a ValueError unless idx is a (B, T) batch of prompts with T >= 1 (generation continues the last token)."""
    if idx.dim() != 2:
        raise ValueError(f"the prompt must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}")
    if idx.size(1) == 0:
        raise ValueError(f"the prompt needs at least one token to continue, got shape {tuple(idx.shape)}")


class GPT(nn.Module):
    """nanoGPT's GPT-2: token and position embeddings, n_layer Blocks, ln_f, and lm_head tied to wte.

    Initialized as GPT-2 (normal(0, 0.02), c_proj weights 0.02 / sqrt(2 n_layer), zero biases,
    unit norms) from the global generator.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the head reads the token embedding matrix (one tensor, two names)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std 0.02 / sqrt(2 n_layer)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counting the tied wte/lm_head once; by default without the position embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, *, kv_cache=None):
        """idx, targets: (B, T) token ids -> (logits (B, T, V), mean cross-entropy or None).

        kv_cache: a `kv_cache.KVCache`, or None. With it idx holds the positions after the cached ones,
        whose keys and values are appended to the cache (chapter 13).
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of length {T}: block_size is only "
                f"{self.config.block_size}; crop the input or raise block_size"
            )
        start = 0 if kv_cache is None else kv_cache.check(B, T, self.config, self.config.n_head)
        check_token_ids(idx, self.config.vocab_size)
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        kvs = [None] * self.config.n_layer if kv_cache is None else kv_cache.layers
        for block, kv in zip(self.transformer.h, kvs):
            x = block(x, kv)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None if targets is None else cross_entropy(logits, targets)
        return logits, loss

    def generate(self, idx, max_new_tokens, **options):
        """Extend idx (B, T) by max_new_tokens tokens; options (temperature, top_k, greedy, generator,
        kv_cache) as `generate` below takes them."""
        return generate(self, idx, max_new_tokens, **options)


def untrained_gpt(config: GPTConfig, seed: int = 0, block_std: float | None = 0.2) -> GPT:
    """A dense GPT in eval mode whose every parameter is random, biases and layer norms included.

    Derived in chapter 6. GPT-2's init (zero biases, unit norms) would hide a bias added twice or
    a misplaced norm weight, so (normal(mean, std)): biases normal(0, 0.05), layer-norm weights
    normal(1, 0.1), the blocks' other weights normal(0, block_std) (None: GPT-2's init). Calls
    torch.manual_seed(seed) and draws from the global generator, so what is drawn after it is
    fixed by `seed` too.
    """
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("bias"):
                w.normal_(0.0, 0.05)
            elif ".ln_" in name:
                w.normal_(1.0, 0.1)
            elif block_std is not None and name.startswith("transformer.h."):
                w.normal_(0.0, block_std)
    return model.eval()


def cross_entropy(logits, targets):
    """Mean cross-entropy of logits (B, T, V) against targets (B, T); targets of -1 are ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


@torch.no_grad()
def generate(
    model,
    idx,
    max_new_tokens,
    *,
    temperature=1.0,
    top_k=None,
    greedy=True,
    generator=None,
    argmax=None,
    gather_logits=None,
    kv_cache=True,
):
    """Append max_new_tokens tokens to idx (B, T), feeding each prediction back in; return (B, T + new).

    `model(idx)` must return (logits, loss) and `model.config.block_size` bound the context (the
    dense GPT and the tensor-parallel one both do). greedy=True takes the argmax: deterministic,
    so two models that agree on the logits generate identical tokens. greedy=False samples from
    softmax(logits / temperature), optionally restricted to the top_k tokens, with `generator`.
    Call model.eval() first if the model has dropout.

    kv_cache=True (chapter 13): `model(idx, kv_cache=cache)` must accept a `kv_cache.KVCache`; the prompt
    fills it, then each step feeds only the newest token. kv_cache=False recomputes the whole
    context for every token, as nanoGPT does. Both see the same context: the last block_size
    tokens at positions 0 to block_size - 1. Past block_size that window slides, every token's
    position changes, and the cached keys (computed at the old positions) are stale, so the cache
    is cleared and refilled from the window: the same tokens as without it, at no-cache cost per
    token from then on. (A rolling cache that keeps the old keys would be cheaper, and different.)

    argmax, gather_logits: for a model whose logits are split over ranks (`tp_model.TPGPT` with
    vocab_parallel=True), functions of the last position's logits (B, V'): the id of the largest
    logit (B,), and the full logits (B, V). By default the logits are whole: torch's argmax, and
    the logits themselves.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: it must be > 0 (use greedy=True for argmax)")
    check_prompt(idx)
    block_size = model.config.block_size
    cache = KVCache(model.config.n_layer) if kv_cache else None
    for _ in range(max_new_tokens):
        if cache is None:
            logits, _ = model(idx[:, -block_size:])  # (B, <= block_size) the whole context
        else:
            if idx.size(1) > block_size:  # the window slid: every cached position is stale
                cache.clear()
            logits, _ = model(idx[:, cache.length :][:, -block_size:], kv_cache=cache)  # the tokens not cached
        logits = logits[:, -1, :]  # (B, V) the prediction for the next position (split: (B, V_pad/p))
        if greedy:
            idx_next = (logits.argmax(dim=-1) if argmax is None else argmax(logits)).unsqueeze(1)  # (B, 1)
        else:
            if gather_logits is not None:
                logits = gather_logits(logits)  # (B, V)
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, V)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
