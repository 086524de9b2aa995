"""The KV cache (chapter 13): the keys and values of the positions fed so far, per layer.

Derived in chapter 13. Generation (`model.generate`) feeds the prompt once and then only the
newest token; each attention layer (`model.CausalSelfAttention`, `tp_model.TPCausalSelfAttention`) appends
the new positions' k and v to its `LayerKV` and attends to all of them. A tensor-parallel rank
caches its own heads only, nh/p of them: `kv_cache_bytes_per_rank` counts the bytes.
"""

import torch

from .shard import divide


class LayerKV:
    """One layer's cached keys and values, k and v (B, nh, T, hs), or None while empty (chapter 13)."""

    def __init__(self):
        self.k = self.v = None

    def append(self, k, v):
        """Append the new positions' k and v (B, nh, T_new, hs); return all of them, (B, nh, T + T_new, hs)."""
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=-2), torch.cat((self.v, v), dim=-2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """The keys and values of every position fed so far, per layer: what a new token attends to.

    Derived in chapter 13. `layers[i]` is layer i's `LayerKV`; a model given the cache
    (`GPT.forward(idx, kv_cache=cache)`) appends the new positions' k and v and attends to all
    of them, so the next call feeds only the new token. A tensor-parallel rank caches its own
    heads only: nh/p of them, 1/p of the dense cache. For inference: tensors are kept as given
    (generate runs under no_grad). One cache per batch; `clear()` empties it.
    """

    def __init__(self, n_layer: int):
        self.layers = [LayerKV() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Positions cached: the position of the next token fed."""
        k = self.layers[0].k
        return 0 if k is None else k.size(-2)

    def nbytes(self) -> int:
        """Bytes held by the cached tensors, summed over layers, k and v."""
        return sum(t.numel() * t.element_size() for kv in self.layers for t in (kv.k, kv.v) if t is not None)

    def clear(self):
        for kv in self.layers:
            kv.k = kv.v = None

    def check(self, B: int, T: int, config, n_head: int) -> int:
        """Raise a ValueError unless a batch (B, T) fits this cache of a model with n_head heads (on
        this rank) and `config`'s layers and block_size; return the position of its first token.

        Models call it before any communication, so every rank raises the same error.
        """
        if len(self.layers) != config.n_layer:
            raise ValueError(f"a KVCache of {len(self.layers)} layers for a model of {config.n_layer}")
        k = self.layers[0].k
        if k is not None and k.size(0) != B:
            raise ValueError(
                f"the KV cache holds a batch of {k.size(0)} sequences, not {B}: use one cache per batch (or clear() it)"
            )
        if k is not None and k.size(1) != n_head:
            raise ValueError(
                f"the KV cache holds {k.size(1)} heads per layer, this model {n_head} (on this rank): "
                f"a cache filled by a model split over another number of ranks"
            )
        if self.length + T > config.block_size:
            raise ValueError(
                f"the KV cache holds {self.length} positions, and {T} more exceed block_size "
                f"{config.block_size}: clear() it and feed the last block_size tokens (what generate does)"
            )
        return self.length


def kv_cache_bytes_per_rank(config, batch_size: int, length: int, p: int = 1, dtype=torch.float32) -> int:
    """Bytes of one rank's KV cache holding `length` positions of `batch_size` sequences (chapter 13).

    2 (k and v) * n_layer * B * T * (C/p) * bytes per number: each rank caches its nh/p heads of
    hs numbers, C/p per position. p = 1 is the dense model's cache.
    """
    heads = divide(config.n_head, p, "n_head")
    return 2 * config.n_layer * batch_size * length * heads * config.head_size * torch.finfo(dtype).bits // 8
