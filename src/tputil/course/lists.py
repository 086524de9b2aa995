"""Collectives on explicit per-device lists of tensors: the simulation of chapters 1 and 2.

A list stands for p devices: ``xs[r]`` is the tensor that device (rank) ``r`` holds. A collective
takes such a list and returns a new one, ``out[r]`` being what device ``r`` holds afterwards, just
as the real collective would leave it. Every returned tensor is a fresh copy (each device owns its
memory), and the inputs are never modified.

Derived in chapter 1: ``all_reduce`` (every device ends with the sum of all devices' tensors).
Derived in chapter 2: ``all_gather`` (every device ends with all tensors, concatenated in rank
order), ``reduce_scatter`` (device r ends with chunk r of the sum) and ``broadcast`` (every device
ends with device src's tensor). Each validates its input with ``_check_per_device`` and keeps the
same list-in, list-out shape. Sums run in rank order, as in ``all_reduce``, so that
``all_gather(reduce_scatter(xs))`` equals ``all_reduce(xs)`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..comm.group import reduce_in_rank_order
from ..shard import divisors

__all__ = ["all_reduce", "all_gather", "reduce_scatter", "broadcast"]


def _check_per_device(xs: Sequence[Tensor], op: str) -> None:
    """Check that ``xs`` is a non-empty list of same-shape, same-dtype tensors, one per device.

    ``op`` names the collective in the error message. Raises ``TypeError`` for the wrong kind of
    input and ``ValueError`` for an empty list or mismatched tensors; each message says what to
    change.
    """
    if isinstance(xs, Tensor):
        raise TypeError(
            f"{op} takes a list with one tensor per device, got a single Tensor of shape "
            f"{tuple(xs.shape)}; wrap the per-device tensors in a list: {op}([x0, x1, ...])"
        )
    if not isinstance(xs, (list, tuple)):
        raise TypeError(
            f"{op} takes a list with one tensor per device, got {type(xs).__name__}; pass a list: {op}([x0, x1, ...])"
        )
    if len(xs) == 0:
        raise ValueError(f"{op} got an empty list: pass one tensor per device (at least one device)")
    for r, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{op}: device {r} holds a {type(x).__name__}, not a Tensor; convert it with torch.as_tensor"
            )
    shape0, dtype0 = xs[0].shape, xs[0].dtype
    for r, x in enumerate(xs[1:], start=1):
        if x.shape != shape0:
            raise ValueError(
                f"{op} needs the same shape on every device: device 0 holds {tuple(shape0)}, "
                f"device {r} holds {tuple(x.shape)}; make every device's tensor {tuple(shape0)}"
            )
        if x.dtype != dtype0:
            raise ValueError(
                f"{op} needs the same dtype on every device: device 0 holds {dtype0}, "
                f"device {r} holds {x.dtype}; convert with .to({dtype0})"
            )


def all_reduce(xs: Sequence[Tensor]) -> list[Tensor]:
    """Every device ends with the sum over devices: ``out[r] = xs[0] + xs[1] + ... + xs[p-1]``.

    The sum runs in rank order, ``((xs[0] + xs[1]) + xs[2]) + ...``, once, and every device gets
    its own copy of that one result, so all devices hold bitwise identical tensors (floating-point
    addition is not associative: devices that each added in their own order could disagree in the
    last bits). With one device this returns a copy of its tensor.

    Example: ``all_reduce([tensor([1., 2.]), tensor([3., 4.])])`` gives
    ``[tensor([4., 6.]), tensor([4., 6.])]``.
    """
    _check_per_device(xs, "all_reduce")
    total = reduce_in_rank_order(xs, "sum")  # ((xs[0] + xs[1]) + xs[2]) + ..., as comm's groups add
    return [total.clone() for _ in xs]


def _check_dim(xs: Sequence[Tensor], dim: int, op: str) -> int:
    """``dim`` as a non-negative index into the devices' tensors, or a ValueError saying why not."""
    ndim = xs[0].dim()
    if ndim == 0:
        raise ValueError(
            f"{op} cuts or joins along a dimension, but the devices hold 0-d tensors (scalars); "
            f"give them a dimension first, e.g. x.reshape(1)"
        )
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"{op}: dim={dim} is out of range for tensors of shape {tuple(xs[0].shape)}; "
            f"use a dim in [{-ndim}, {ndim - 1}]"
        )
    return dim % ndim


def all_gather(xs: Sequence[Tensor], dim: int = -1) -> list[Tensor]:
    """Every device ends with all devices' tensors side by side: ``cat([xs[0], ..., xs[p-1]], dim)``.

    The pieces go in rank order along ``dim`` (the last dimension by default, as in
    ``Group.all_gather``), so the output's ``dim`` is p times as long as the input's. Nothing is
    added: an all-gather concatenates. With one device this returns a copy of its tensor.

    Example: ``all_gather([tensor([1., 2.]), tensor([3., 4.])])`` gives
    ``[tensor([1., 2., 3., 4.]), tensor([1., 2., 3., 4.])]``.
    """
    _check_per_device(xs, "all_gather")
    dim = _check_dim(xs, dim, "all_gather")
    total = torch.cat(list(xs), dim=dim)
    return [total.clone() for _ in xs]


def reduce_scatter(xs: Sequence[Tensor], dim: int = -1) -> list[Tensor]:
    """Device r ends with chunk r of the sum: ``(xs[0] + ... + xs[p-1]).chunk(p, dim)[r]``.

    The sum runs in rank order, as in ``all_reduce``; it is then cut into p equal chunks along
    ``dim`` (the last dimension by default, as in ``Group.reduce_scatter``), and device r keeps
    chunk r, a contiguous copy. The size of ``dim`` must be divisible by p. With one device this
    returns a copy of its tensor.

    Example: ``reduce_scatter([tensor([1., 2.]), tensor([3., 4.])])`` gives
    ``[tensor([4.]), tensor([6.])]``.
    """
    _check_per_device(xs, "reduce_scatter")
    dim = _check_dim(xs, dim, "reduce_scatter")
    p, size = len(xs), xs[0].size(dim)
    if size % p != 0:
        raise ValueError(
            f"reduce_scatter cuts dim {dim} (size {size}) of shape {tuple(xs[0].shape)} into p={p} "
            f"equal chunks, but {size} is not divisible by {p}; use a number of devices in {divisors(size)} "
            f"or pad dim {dim} to a multiple of {p}"
        )
    total = reduce_in_rank_order(xs, "sum")  # rank order, as in all_reduce
    return [chunk.clone() for chunk in total.chunk(p, dim=dim)]


def broadcast(xs: Sequence[Tensor], src: int = 0) -> list[Tensor]:
    """Every device ends with a copy of device ``src``'s tensor: ``out[r] = xs[src]``.

    The other devices' tensors are only buffers of the right shape and dtype (a real broadcast
    overwrites them); their values do not matter. With one device this returns a copy of its
    tensor.

    Example: ``broadcast([tensor([1., 2.]), tensor([0., 0.])], src=0)`` gives
    ``[tensor([1., 2.]), tensor([1., 2.])]``.
    """
    _check_per_device(xs, "broadcast")
    p = len(xs)
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < p:
        raise ValueError(f"broadcast: src={src!r} is not a device of this list; use a rank in range({p})")
    return [xs[src].clone() for _ in xs]
