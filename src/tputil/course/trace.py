"""Which module issued each collective: the counter's log, attributed to the model's modules.

Derived in chapter 6, for its picture of where a block communicates. `group.stats.log` records
every collective a rank makes (kind, shape, dtype, bytes, tag) but not which layer made it.
`trace_collectives(model, group)` brackets each leaf module's forward (and backward) with hooks
that note the length of the log on entry and on exit; the collectives logged in between are that
module's. It records each leaf module's output shape too, so a figure can show what is split.

    with trace_collectives(model, group) as trace:
        logits, loss = model(idx, targets)
        loss.backward()
    trace.collectives("forward")  # [(module name, CallRecord), ...] in the order they happened
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..rng import Dropout

__all__ = ["ModuleCall", "CollectiveTrace", "trace_collectives"]

# Modules that return their input unchanged in eval mode: a backward hook on them gains nothing.
_SKIP = (nn.Dropout, Dropout, nn.Identity)  # Dropout: the models' own (rng.Dropout)


@dataclass(frozen=True)
class ModuleCall:
    """One run of a leaf module: phase "forward" or "backward", its name, class, output shape
    (forward; for backward the shape of the gradient it received) and the collectives it issued."""

    phase: str
    module: str
    kind: str
    shape: tuple
    collectives: tuple


class CollectiveTrace:
    """The module calls seen by `trace_collectives`, in the order they finished."""

    def __init__(self, log):
        self._log = log
        self._start = len(log)
        self.calls: list[ModuleCall] = []
        self._claimed = 0  # log entries (after _start) already attributed

    def _take(self, since: int) -> tuple:
        """The log entries from index `since` on that no module has claimed yet."""
        first = max(since, self._start + self._claimed)
        new = tuple(self._log[first:])
        self._claimed = len(self._log) - self._start
        return new

    def collectives(self, phase: str | None = None) -> list:
        """[(module name, CallRecord)] in order; phase "forward", "backward" or None for both."""
        return [(c.module, r) for c in self.calls if phase in (None, c.phase) for r in c.collectives]

    def modules(self, phase: str = "forward", prefix: str = "") -> list[ModuleCall]:
        """The calls of one phase whose module name starts with `prefix`, in order."""
        return [c for c in self.calls if c.phase == phase and c.module.startswith(prefix)]

    @property
    def unattributed(self) -> list:
        """Collectives logged while tracing that happened outside every leaf module."""
        seen = {id(r) for c in self.calls for r in c.collectives}
        return [r for r in self._log[self._start :] if id(r) not in seen]


def _shape(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return tuple(x[0].shape)
    return ()


@contextmanager
def trace_collectives(model: nn.Module, group, *, backward: bool = True):
    """Attribute `group`'s collectives to `model`'s leaf modules while the `with` block runs.

    Leaf modules are those without children (Linear, LayerNorm, Embedding, GELU, the parallel
    layers). Dropout and Identity are skipped (they pass their input through). With
    backward=True, full backward hooks bracket each module's backward as well (not an
    Embedding's: its input, token ids, has no gradient, and it communicates nothing). The hooks are
    removed when the block ends. The trace sees only `group.stats.log`: at p = 1 it is empty.
    """
    trace = CollectiveTrace(group.stats.log)
    handles, starts = [], {}

    def enter(name, phase):
        def hook(module, *args):
            starts[(name, phase)] = len(trace._log)

        return hook

    def leave(name, phase):
        def hook(module, *args):
            start = starts.pop((name, phase), None)
            if start is None:
                return
            shape = _shape(args[-1])  # forward: the output; backward: the gradient of the output
            trace.calls.append(ModuleCall(phase, name, type(module).__name__, shape, trace._take(start)))

        return hook

    for name, module in model.named_modules():
        if any(True for _ in module.children()) or isinstance(module, _SKIP):
            continue
        handles.append(module.register_forward_pre_hook(enter(name, "forward")))
        handles.append(module.register_forward_hook(leave(name, "forward")))
        if backward and not isinstance(module, nn.Embedding):  # its input, token ids, has no gradient
            handles.append(module.register_full_backward_pre_hook(enter(name, "backward")))
            handles.append(module.register_full_backward_hook(leave(name, "backward")))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()
