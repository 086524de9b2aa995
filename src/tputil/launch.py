"""Run one SPMD function on p real processes and collect what each rank returns.

Minimal for now (used in tests and from chapter 8, which extends it). `run_processes(fn, p, ...)`
spawns p fresh Python processes, joins them into one torch.distributed group on 127.0.0.1 and
calls `fn(DistGroup(), *args)` on each. `fn` must be importable by the children (a module-level
function in a module, not one defined in a notebook cell); args and results must pickle.
"""

import os
import pickle
import queue
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .comm import DistGroup, RankError


def default_backend(world_size: int) -> str:
    """nccl when every rank can have its own GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() and world_size <= torch.cuda.device_count() else "gloo"


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _worker(rank, world_size, port, backend, timeout, fn, args, results):
    try:
        # p processes share the cores: each takes its share of intra-op threads (as torchrun does),
        # or their thread teams spin against each other and small ops slow down a hundredfold
        torch.set_num_threads(max(1, _cpus() // world_size))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        value = fn(DistGroup(), *args)
        # plain pickle copies tensor data into bytes (no shared memory that dies with this process)
        results.put((rank, "ok", pickle.dumps(_to_cpu(value))))
    except BaseException:  # noqa: B902 - sent to the parent, which raises it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_importable(fn):
    """Spawned children find fn by its module and name: fail early, clearly, if they cannot."""
    main_has_file = hasattr(sys.modules.get("__main__"), "__file__")
    name = getattr(fn, "__qualname__", "")
    if "<" in name or (getattr(fn, "__module__", None) == "__main__" and not main_has_file):
        raise ValueError(f"run_processes needs a function the child processes can import, but {name or fn!r} "
                         f"is defined in a notebook cell, inside a function or as a lambda: define it at "
                         f"module level in a .py file and import it")


def _stop(procs):
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_processes(fn, world_size: int, *args, backend: str | None = None, timeout: float = 60.0) -> list:
    """fn(DistGroup(), *args) on world_size spawned processes; returns each rank's result, in rank order.

    backend None picks `default_backend(world_size)`. Tensors in the results come back on the CPU.
    If a rank raises, every process is stopped and a RankError naming the rank carries its
    traceback; likewise after `timeout` seconds (for the whole run, start-up included).
    """
    _check_importable(fn)
    backend = backend or default_backend(world_size)
    # The parent hosts the rendezvous store on a free port (port 0: the OS picks one), so no port
    # can be taken by someone else between choosing it and using it.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world_size, store.port, backend, timeout, fn, args, results),
                         name=f"tputil-rank{r}", daemon=True) for r in range(world_size)]
    out, deadline = {}, time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        while len(out) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.1)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    raise RankError(dead[0], f"rank {dead[0]} of {world_size} died with exit code "
                                             f"{procs[dead[0]].exitcode} before returning a result")
                if time.monotonic() > deadline:
                    waiting = [r for r in range(world_size) if r not in out]
                    raise TimeoutError(f"run_processes timed out after {timeout}s; ranks {waiting} did not finish")
                continue
            if status == "error":
                dead = [r for r, p in enumerate(procs) if r != rank and p.exitcode not in (None, 0)]
                if dead:  # a rank that died silently is the likelier cause of the others' errors
                    last = payload.strip().splitlines()[-1]
                    raise RankError(dead[0], f"rank {dead[0]} of {world_size} died with exit code "
                                             f"{procs[dead[0]].exitcode}; then rank {rank} failed: {last}")
                raise RankError(rank, f"rank {rank} of {world_size} failed:\n{payload}")
            out[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        _stop(procs)
        results.close()
        results.cancel_join_thread()
        del store
    return [out[r] for r in range(world_size)]
