"""Functions of logits sharded over the vocabulary: the cross-entropy and the argmax, never gathered.

Derived in chapter 10, after Megatron-LM's `vocab_parallel_cross_entropy` (written from the
formulas, not copied). Rank r holds the logits of the token ids [start, start + V/p): the columns
Z_r of Z = [Z_1, ..., Z_p], shape (..., V/p). The cross-entropy of one position with target t,

    loss = log sum_j exp(z_j) - z_t = log sum_j exp(z_j - m) - (z_t - m),   m = max_j z_j,

needs three numbers per position from all ranks, and nothing else:

1. m, the largest logit (an all-reduce with op="max"; subtracting it keeps exp from overflowing);
2. z_t - m, the target's logit: the rank that owns t contributes it, the others 0 (all-reduce sum);
3. sum_j exp(z_j - m), each rank summing its own columns (all-reduce sum).

Three all-reduces of B*T numbers each, against an all-gather of B*T*V for the full logits. The
gradient dloss/dz_j = softmax(z)_j - [j = t] is local: each rank already holds softmax of its own
columns (exp(z_j - m) / sum), so backward communicates nothing.

Padding (`shard.pad_vocab_size`): columns of ids >= vocab_size are not classes; both functions
treat their logits as -inf, so the loss and the argmax are the unpadded model's and the padded
columns get exactly zero gradient.
"""

import torch

REDUCTIONS = ("mean", "sum", "none")


def _layout(logits, group, vocab_start, vocab_size):
    """(vocab_start, vocab_size) with the defaults filled in: equal contiguous shards, no padding."""
    n_local = logits.size(-1)
    if vocab_start is None:
        vocab_start = group.rank * n_local
    if vocab_size is None:
        vocab_size = n_local * group.world_size
    if not 1 <= vocab_size <= n_local * group.world_size:
        raise ValueError(
            f"vocab_size={vocab_size}: it must be in [1, {n_local * group.world_size}], "
            f"the padded vocabulary (p={group.world_size} shards of {n_local} logits)"
        )
    return vocab_start, vocab_size


def _masked(logits, vocab_start, vocab_size):
    """This rank's logits with the columns of padding ids (>= vocab_size) set to -inf (itself if it has none)."""
    if vocab_start + logits.size(-1) <= vocab_size:
        return logits
    ids = torch.arange(vocab_start, vocab_start + logits.size(-1), device=logits.device)  # (V/p,) global ids
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-position losses (...) from logit shards (..., V/p); ignored positions give 0."""

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_size, ignore_index):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 logits: exp and sums in float32
        z = _masked(logits.to(dtype), vocab_start, vocab_size)  # (..., V/p)
        n_local = z.size(-1)
        # 1. m = max_j z_j over the whole vocabulary
        m = group.all_reduce(z.amax(dim=-1), op="max", tag="vocab_parallel_cross_entropy.max")  # (...)
        z = z - m.unsqueeze(-1)  # (..., V/p) all <= 0
        # 2. z_t - m: only the rank owning the target has it; the others contribute 0
        local = targets - vocab_start  # (...) the target's column on this rank, if it is ours
        owned = (local >= 0) & (local < n_local)
        local = local.masked_fill(~owned, 0)
        z_t = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)  # (...)
        z_t = group.all_reduce(z_t, tag="vocab_parallel_cross_entropy.target_logit")  # (...)
        # 3. sum_j exp(z_j - m)
        exp = z.exp_()  # (..., V/p) in place: z is a temporary of ours
        sum_exp = group.all_reduce(exp.sum(dim=-1), tag="vocab_parallel_cross_entropy.sum_exp")  # (...)
        valid = targets != ignore_index
        loss = (sum_exp.log() - z_t).masked_fill(~valid, 0.0)  # (...)
        # softmax = exp / sum_exp is formed in backward: a forward without gradients skips it
        ctx.save_for_backward(exp, sum_exp, local, owned, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        exp, sum_exp, local, owned, valid = ctx.saved_tensors
        grad = exp / sum_exp.unsqueeze(-1)  # (..., V/p) this rank's columns of softmax(z) ...
        grad.scatter_add_(-1, local.unsqueeze(-1), -owned.to(grad.dtype).unsqueeze(-1))  # ... - onehot(t), ours
        grad.mul_((grad_loss * valid).unsqueeze(-1))  # ignored positions: no gradient
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits,
    targets,
    *,
    group,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -1,
    reduction: str = "mean",
):
    """F.cross_entropy(Z, targets) from this rank's columns Z_r (..., V/p) of the logits, never gathering Z.

    targets (...) hold global token ids (the same on every rank). vocab_start: the first id of this
    rank's columns (default rank * V/p). vocab_size: the real vocabulary; columns of ids >= it are
    padding, never a class (default: no padding). reduction: "mean" over the targets that are not
    ignore_index (F.cross_entropy's default; nan if all are ignored, like it), "sum", or "none"
    (per position, 0 where ignored). Communication: three all-reduces of B*T numbers in forward,
    none in backward. The loss is in float32 at least (float64 logits: float64); the gradient in the
    logits' dtype.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: use one of {REDUCTIONS}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match logits of shape "
            f"{tuple(logits.shape)}: expected {tuple(logits.shape[:-1])}"
        )
    vocab_start, vocab_size = _layout(logits, group, vocab_start, vocab_size)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))  # every rank sees the same
    if bad.any():
        raise ValueError(
            f"target {targets[bad][0].item()} is not a token id in [0, {vocab_size}) (nor ignore_index={ignore_index})"
        )
    losses = _VocabParallelCrossEntropy.apply(logits, targets, group, vocab_start, vocab_size, ignore_index)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum()


@torch.no_grad()
def vocab_parallel_argmax(logits, *, group, vocab_start: int | None = None, vocab_size: int | None = None):
    """argmax over the whole vocabulary (...) from this rank's columns (..., V/p), never gathering them.

    Like torch.argmax, the first (smallest) id wins a tie. Two all-reduces of B*T numbers: the max
    of the ranks' largest logits, then the min over the ranks whose largest logit equals it of that
    logit's global id. Padding columns (ids >= vocab_size) are never chosen. The same ids on every rank.
    """
    vocab_start, vocab_size = _layout(logits, group, vocab_start, vocab_size)
    z = _masked(logits, vocab_start, vocab_size)  # (..., V/p)
    local_id = z.argmax(dim=-1)  # (...) the first largest of our columns
    local_max = z.gather(-1, local_id.unsqueeze(-1)).squeeze(-1)  # (...)
    m = group.all_reduce(local_max, op="max", tag="vocab_parallel_argmax.max")  # (...)
    candidate = torch.where(local_max == m, local_id + vocab_start, torch.iinfo(torch.long).max)  # (...)
    return group.all_reduce(candidate, op="min", tag="vocab_parallel_argmax.id")  # (...) the smallest winner
