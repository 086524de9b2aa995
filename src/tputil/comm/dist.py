"""Real torch.distributed behind the Group interface (chapter 8; run by `tputil.launch`)."""

import torch
import torch.distributed as dist

from .group import Group, Handle


class DistGroup(Group):
    """torch.distributed behind the Group interface (init_process_group must have been called).

    process_group=None is the default (world) group. On the NCCL backend `device` is this
    process's current CUDA device; tensors passed in must live there. `all_reduce(...,
    async_op=True)` really starts the all-reduce asynchronously (torch.distributed's async_op);
    the other collectives run synchronously and return a completed `Handle`.
    """

    def __init__(self, process_group=None):
        backend = dist.get_backend(process_group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        super().__init__(dist.get_rank(process_group), dist.get_world_size(process_group), device)
        self.process_group = process_group
        self.backend = backend
        self._native_reduce_scatter = True

    def _all_reduce(self, t, op):
        out = t.clone()  # torch.distributed reduces in place; we do not touch the caller's tensor
        dist.all_reduce(out, op=getattr(dist.ReduceOp, op.upper()), group=self.process_group)
        return out

    def _start_all_reduce(self, t, op):
        out = t.clone()  # written by the all-reduce in flight: read it through Handle.wait()
        work = dist.all_reduce(out, op=getattr(dist.ReduceOp, op.upper()), group=self.process_group, async_op=True)
        return Handle(out, work)

    def _all_gather(self, t, dim):
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.process_group)
        return torch.cat(parts, dim=dim)

    def _reduce_scatter(self, t, dim):
        chunks = [c.contiguous() for c in t.chunk(self.world_size, dim=dim)]
        if self._native_reduce_scatter:
            out = torch.empty_like(chunks[self.rank])
            try:
                dist.reduce_scatter(out, chunks, group=self.process_group)
                return out
            except RuntimeError:  # older gloo has no reduce_scatter: fall back, on every rank alike
                if self.backend != "gloo":
                    raise
                self._native_reduce_scatter = False
        return self._all_reduce(t, "sum").chunk(self.world_size, dim=dim)[self.rank].contiguous()

    def _broadcast(self, t, src):
        out = t.clone()
        global_src = src if self.process_group is None else dist.get_global_rank(self.process_group, src)
        dist.broadcast(out, src=global_src, group=self.process_group)
        return out
