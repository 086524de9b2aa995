"""The conjugate communication operators as autograd functions, after Megatron-LM's mpu/mappings.py.

Used from chapter 3 (the parallel layers), derived in chapter 9 (backward): f = copy_to_parallel_region
and g = reduce_from_parallel_region, and the gather/scatter pair; the sequence-parallel mappings
along T (scatter, gather, reduce-scatter) are derived in chapter 11. Private `autograd.Function`s only
call the group's collectives; the public wrappers take (x, group) and return x itself at p = 1.
"""

import torch


def _split_last(x, group):
    """This rank's chunk of the last dim (no communication)."""
    size = x.size(-1)
    if size % group.world_size != 0:
        raise ValueError(f"cannot split the last dim of shape {tuple(x.shape)} into p={group.world_size} equal chunks")
    return x.chunk(group.world_size, dim=-1)[group.rank].contiguous()


class _CopyToParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_reduce(grad, tag="copy_to_parallel_region.backward"), None


class _ReduceFromParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return group.all_reduce(x, tag="reduce_from_parallel_region.forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.all_gather(x, dim=-1, tag="gather_from_parallel_region.forward")

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_gather(grad, dim=-1, tag="scatter_to_parallel_region.backward"), None


def copy_to_parallel_region(x, group):
    """f: forward identity (every rank already holds x); backward all-reduce of the gradients."""
    return x if group.world_size == 1 else _CopyToParallelRegion.apply(x, group)


def reduce_from_parallel_region(x, group):
    """g: forward all-reduce (sum the partial results); backward identity."""
    return x if group.world_size == 1 else _ReduceFromParallelRegion.apply(x, group)


def gather_from_parallel_region(x, group):
    """Forward all-gather along the last dim; backward keep this rank's chunk of the gradient."""
    return x if group.world_size == 1 else _GatherFromParallelRegion.apply(x, group)


def scatter_to_parallel_region(x, group):
    """Forward keep this rank's chunk of the last dim; backward all-gather of the gradients."""
    return x if group.world_size == 1 else _ScatterToParallelRegion.apply(x, group)


# Sequence parallelism (chapter 11): the activations outside the tensor-parallel regions split along T.
SEQUENCE_DIM = 1  # T in (B, T, C)


def _split_sequence(x, group):
    """This rank's chunk of dim 1 (T) (no communication)."""
    size = x.size(SEQUENCE_DIM)
    if size % group.world_size != 0:
        raise ValueError(
            f"cannot split dim {SEQUENCE_DIM} (T) of shape {tuple(x.shape)} into p={group.world_size} equal chunks: "
            f"pad T to a multiple of {group.world_size}"
        )
    return x.chunk(group.world_size, dim=SEQUENCE_DIM)[group.rank].contiguous()


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_gather(grad, dim=SEQUENCE_DIM, tag="scatter_to_sequence_parallel_region.backward"), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group, ctx.tensor_parallel_output_grad = group, tensor_parallel_output_grad
        return group.all_gather(x, dim=SEQUENCE_DIM, tag="gather_from_sequence_parallel_region.forward")

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:  # each rank holds a partial sum of dL/dX for all T: sum, keep own T
            tag = "gather_from_sequence_parallel_region.backward"
            return ctx.group.reduce_scatter(grad, dim=SEQUENCE_DIM, tag=tag), None, None
        return _split_sequence(grad, ctx.group), None, None  # the whole dL/dX on every rank: keep own T


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.reduce_scatter(x, dim=SEQUENCE_DIM, tag="reduce_scatter_to_sequence_parallel_region.forward")

    @staticmethod
    def backward(ctx, grad):
        tag = "reduce_scatter_to_sequence_parallel_region.backward"
        return ctx.group.all_gather(grad, dim=SEQUENCE_DIM, tag=tag), None


def scatter_to_sequence_parallel_region(x, group):
    """(B, T, C) replicated -> (B, T/p, C): forward keep this rank's chunk of T; backward all-gather along T."""
    return x if group.world_size == 1 else _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(x, group, *, tensor_parallel_output_grad: bool = True):
    """(B, T/p, C) -> (B, T, C): forward all-gather along T.

    Backward: with tensor_parallel_output_grad (the consumer is tensor-parallel, e.g. a column-parallel
    layer, so each rank's dL/dX is a partial sum) reduce-scatter along T; without (the consumer is
    replicated, e.g. the replicated head, so each rank holds the whole dL/dX) keep this rank's chunk of T.
    """
    if group.world_size == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x, group):
    """(B, T, C) partial sums -> (B, T/p, C): forward reduce-scatter along T; backward all-gather along T.

    Takes g's place (g = reduce_from_parallel_region): the same sum, but each rank keeps only its tokens.
    """
    return x if group.world_size == 1 else _ReduceScatterToSequenceParallelRegion.apply(x, group)
