"""All-reduce through shared memory between processes on one machine (chapter 8, "Where the time goes").

gloo moves every CPU tensor through TCP sockets, even between two processes on the same machine:
each all-reduce is copied into the kernel and out again, several times, by gloo's own threads,
which on a machine whose cores are all busy computing have to wait for a core. Libraries that run
tensor parallelism inside one machine avoid the sockets: NCCL between GPUs of one node, and the
CPU back ends of inference servers, which all-reduce through a shared-memory segment. `ShmGroup`
does the same for the all-reduces of this book, with plain tensor operations:

- one segment in /dev/shm, mapped by every rank (`torch.from_file(shared=True)`), holds for each of
  two alternating slots a header (a sequence number, the element count, the op and the dtype) and
  a buffer per rank;
- `all_reduce` number n writes this rank's tensor into its buffer of slot n % 2, then its header,
  the sequence number last; it waits until every rank's header in that slot says n; then every rank
  adds the p buffers **in rank order** (the order of `ThreadGroup`, so the ranks agree bit for bit,
  and at p = 2 the sum equals gloo's), into a tensor of its own;
- two slots suffice: a rank can start call n + 1 only after every rank has published call n, which
  each does only after it has finished reading call n - 1, the other slot. One slot does not: a
  fast rank would overwrite its buffer with call n + 1 while a slow one still reads call n
  (`ch08_real_processes.shm_slots` shows the wrong sum, with `slots=1` and a slow reader).

Everything else (all-gather, reduce-scatter, broadcast; tensors larger than `capacity_bytes`) goes
to `torch.distributed` as in `DistGroup`, whose subclass this is: the layers cannot tell the
difference, and the counts in `group.stats` are the same. A wait longer than `timeout` seconds (a
rank that died or skipped the call) raises `CollectiveError` naming the ranks that did not arrive;
ranks that arrive with different sizes, ops or dtypes raise at once. The segment is unlinked as soon
as every rank has mapped it, so it vanishes with the processes, whatever way they end.

Only for CPU tensors of ranks on the same machine. On x86-64 the processor keeps a core's stores in
program order for the other cores (the data is seen before the sequence number written after it).
Other processors, ARM among them, may show them out of order, so there (`ordered_stores` False)
each all-reduce also passes a barrier through the process group after writing: a message through
the kernel, which orders the stores, at about the cost of one gloo collective. The sums are the
same bits either way.
"""

import os
import platform
import socket
import tempfile
import time

import torch
import torch.distributed as dist

from .dist import DistGroup
from .group import REDUCE_OPS, Group, reduce_in_rank_order
from .threads import CollectiveError

_OPS = {op: code for code, op in enumerate(REDUCE_OPS, start=1)}  # 0: nothing written yet
_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32]
_HEADER = 8  # int64 per (slot, rank): sequence number, numel, op, dtype; padded to a cache line
_ALIGN = 64


class ShmGroup(DistGroup):
    """A DistGroup whose all-reduces of CPU tensors go through a shared-memory segment (see the module).

    capacity_bytes: the largest tensor (per rank) that goes through shared memory; larger ones go
    through the process group. timeout: seconds a rank waits for the others in one all-reduce.
    slots: alternating slots of buffers and headers; 2 are needed (see the module), 1 is allowed
    only to show why. ordered_stores: whether other cores see this core's stores in program order
    (x86-64); None asks the processor; False adds a barrier per all-reduce. read_delay: seconds
    this rank sleeps between seeing every rank's sequence number and reading the buffers (0: none),
    a knob for demonstrating why one slot is too few (`ch08_real_processes.shm_slots`), not for use.
    """

    def __init__(
        self,
        process_group=None,
        *,
        capacity_bytes: int = 8 << 20,
        timeout: float = 30.0,
        slots: int = 2,
        ordered_stores: bool | None = None,
        read_delay: float = 0.0,
    ):
        super().__init__(process_group)
        if ordered_stores is None:
            ordered_stores = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
        self.slots, self.ordered_stores, self.read_delay = slots, ordered_stores, read_delay
        if self.device.type != "cpu":
            raise ValueError(
                f"ShmGroup: the {self.backend} backend works on {self.device}; ShmGroup is for "
                "CPU tensors (on GPUs, NCCL already uses the fastest path): use DistGroup"
            )
        if capacity_bytes <= 0 or capacity_bytes % _ALIGN:
            raise ValueError(f"capacity_bytes={capacity_bytes}: it must be a positive multiple of {_ALIGN}")
        if slots < 1 or read_delay < 0:
            raise ValueError(f"slots={slots} must be >= 1 (2 are needed) and read_delay={read_delay} >= 0")
        hosts = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname(), group=process_group)
        if len(set(hosts)) > 1:
            raise ValueError(
                f"ShmGroup: the ranks run on different machines {sorted(set(hosts))}; shared "
                "memory joins processes of one machine only: use DistGroup"
            )
        self.capacity_bytes, self.timeout, self._seq = capacity_bytes, timeout, 0
        p = self.world_size
        header_bytes = slots * p * _HEADER * 8
        self._mapped = self._map_segment(header_bytes + slots * p * capacity_bytes)
        self._headers = self._mapped[:header_bytes].view(torch.int64).view(slots, p, _HEADER)
        self._seqs = self._headers.numpy()[:, :, 0]  # (slots, p) the same memory; numpy reads it in a microsecond
        self._buffers = self._mapped[header_bytes:].view(slots, p, capacity_bytes)

    def _map_segment(self, nbytes):
        """Rank 0 creates the file, every rank maps it, rank 0 unlinks it once all have: nothing is left behind.

        The file's memory is reserved at once (posix_fallocate), so a /dev/shm too small for it is a
        clear error on every rank now, not a crash (SIGBUS) at the first all-reduce that touches it.
        """
        made = [None]  # ("ok", path) or ("error", message), from rank 0 to all
        if self.rank == 0:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            fd, path = tempfile.mkstemp(prefix="tputil-shm-", dir=folder)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, nbytes)
                else:  # macOS: no posix_fallocate; the file is sized, its memory taken when touched
                    os.ftruncate(fd, nbytes)
                made[0] = ("ok", path)
            except OSError as exc:
                os.unlink(path)
                made[0] = (
                    "error",
                    f"ShmGroup: {folder} has no room for {nbytes / 2**20:.1f} MiB ({exc.strerror}): "
                    f"pass a smaller capacity_bytes (now {self.capacity_bytes}), or give {folder} "
                    "more space (in a container: docker run --shm-size)",
                )
            finally:
                os.close(fd)
        dist.broadcast_object_list(made, src=self._global(0), group=self.process_group)
        kind, what = made[0]
        if kind == "error":
            raise ValueError(what)
        try:
            mapped = torch.from_file(what, shared=True, size=nbytes, dtype=torch.uint8)
            dist.barrier(group=self.process_group)
        finally:
            if self.rank == 0:
                os.unlink(what)
        return mapped

    def _global(self, rank):
        return rank if self.process_group is None else dist.get_global_rank(self.process_group, rank)

    def _all_reduce(self, t, op):
        nbytes = t.numel() * t.element_size()
        if t.device.type != "cpu" or t.dtype not in _DTYPES or nbytes > self.capacity_bytes:
            return super()._all_reduce(t, op)
        self._seq += 1
        seq, slot = self._seq, self._seq % self.slots
        n = t.numel()
        buffers = self._buffers[slot, :, :nbytes].view(t.dtype)  # (p, n)
        buffers[self.rank].copy_(t.reshape(-1))
        header = self._headers[slot]
        header[self.rank, 1:4] = torch.tensor([n, _OPS[op], _DTYPES.index(t.dtype)])
        header[self.rank, 0] = seq  # last: the others read the data only after they see this
        if not self.ordered_stores:
            dist.barrier(group=self.process_group)  # every rank's stores are seen before any rank reads
        self._wait_for(slot, seq)
        if not bool((header[:, 1:4] == header[self.rank, 1:4]).all()):
            raise CollectiveError(self._mismatch(header, seq))
        return reduce_in_rank_order(buffers, op).view(t.shape)  # a tensor of this rank's own

    _start_all_reduce = Group._start_all_reduce  # synchronous (see the module), not DistGroup's async one

    def _wait_for(self, slot, seq):
        """Spin until every rank's sequence number in this slot is seq; yield the core when it takes long.

        Then sleep `read_delay` seconds, if set: a slow reader on purpose (see the class docstring).
        """
        seqs, spins, deadline = self._seqs[slot], 0, None
        while seqs.min() < seq:
            spins += 1
            if spins < 200:
                continue
            if deadline is None:
                deadline = time.monotonic() + self.timeout
            if spins < 20000:
                os.sched_yield()  # the core may be the one another rank needs
            else:
                time.sleep(1e-4)
            if time.monotonic() > deadline:
                missing = [r for r in range(self.world_size) if int(seqs[r]) < seq]
                raise CollectiveError(
                    f"ShmGroup all_reduce #{seq} on rank {self.rank} timed out after "
                    f"{self.timeout}s: ranks {missing} did not arrive (a rank died, is stuck, "
                    "or skipped this collective)"
                )
        if self.read_delay:
            time.sleep(self.read_delay)

    def _mismatch(self, header, seq):
        ops = {v: k for k, v in _OPS.items()}
        calls = [f"rank {r}: {int(h[1])} x {_DTYPES[int(h[3])]} ({ops[int(h[2])]})" for r, h in enumerate(header)]
        return (
            f"ShmGroup all_reduce #{seq}: the ranks passed different tensors or ops ({'; '.join(calls)}); "
            "every rank must call the same collectives, in the same order, with the same shapes"
        )
