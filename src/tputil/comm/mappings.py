"""The conjugate communication operators as autograd functions, after Megatron-LM's mpu/mappings.py.

Used from chapter 3 (the parallel layers), derived in chapter 9 (backward): f = copy_to_parallel_region
and g = reduce_from_parallel_region, and the gather/scatter pair. Private `autograd.Function`s only
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
