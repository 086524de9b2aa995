"""Run one SPMD function on p real processes and collect what each rank returns.

Used from chapter 2 (the collectives on real processes) and derived in chapter 8 (real processes).
`run_processes(fn, p, *args)` starts p fresh Python processes, joins them into one
torch.distributed group on 127.0.0.1 and calls `fn(DistGroup(), *args)` on each (a `ShmGroup`
with shm=True). `fn` must be importable by the children (a module-level function in a module, not
one defined in a notebook cell); args and results must pickle. A script that calls run_processes
must do so under `if __name__ == "__main__":` (the children run the script's top-level code to find
a function defined there); without it the call fails at once, saying so.

What can go wrong, and what the caller sees (tests/test_launch_faults.py checks each):
- a rank raises: a RankError naming it, with its traceback, as soon as it happens (the rank then
  waits to be stopped, so the ranks waiting for it in a collective are reported as still running);
- a rank dies (os._exit, a signal, a crash): a RankError naming it and its exit code, with the
  last lines it wrote (a crash prints its Python traceback there: faulthandler is on);
- ranks disagree about collectives: a rank waiting in one that the others never join fails after
  `collective_timeout` seconds (gloo raises; NCCL's watchdog aborts the process), and the error
  says which ranks had returned and which were still running. If the rank that skipped the
  collective has already exited, the waiting rank fails at once ("Connection closed by peer");
- anything else that does not finish (an endless loop outside any collective): a TimeoutError
  after `timeout` seconds for the whole call.
In every case all the children are stopped before the call returns or raises.

How. Each child is a plain subprocess (not multiprocessing), the leader of its own process group,
so stopping a rank (SIGTERM, then SIGKILL) stops what it started too. The job (fn and args,
pickled) goes to each child through its stdin, and its result or error comes back pickled through
a pipe of its own: the parent unpickles only what its children wrote, a child only what the parent
wrote. The rendezvous store listens on 127.0.0.1 alone, on a port the OS picks, and carries only
the rendezvous. A child exits when its stdin closes, that is, when the parent dies. What a rank
prints is shown as "[rank r] ..." lines; its stderr is kept for error messages.
"""

import json
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .comm import DistGroup, RankError, ShmGroup

_SPEC_ENV = "TPUTIL_LAUNCH_SPEC"
# the child first takes the parent's sys.path (so it finds what the parent finds), then starts
_BOOT = (
    f"import json, os, sys; sys.path[:] = json.loads(os.environ['{_SPEC_ENV}'])['sys_path']; "
    f"from tputil.launch import _child_main; _child_main()"
)
_GRACE = 1.0  # s: after a rank fails in a collective, how long to look for the rank that caused it
_TAIL = 40  # lines of each rank's output kept for error messages
_POLL = 0.01  # s between two looks at the ranks
_HEADER = struct.Struct("<Q")  # on both pipes, each pickle is preceded by its length in bytes
# The libuv store (torch's default) serves a socket handed to it (master_listen_fd) only since pytorch
# PR 150215 (2025, which added its missing listen call; checked on torch 2.13): on older versions the
# previous implementation (use_libuv=False) serves it.
_LIBUV_TAKES_A_SOCKET = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 8)
_loading_main = None  # in a child: the parent's main script while the child runs it (see _load_main)


def default_backend(world_size: int) -> str:
    """nccl when every rank can have its own GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() and world_size <= torch.cuda.device_count() else "gloo"


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class RankEnvironment:
    """Who a launcher (torchrun, `run_processes`) says this process is; `launched` False: one process of one."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launched: bool


def environment() -> RankEnvironment:
    """Read RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun sets them (rank 0 of 1 without them)."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", 1))
    return RankEnvironment(
        int(env.get("RANK", 0)),
        world_size,
        int(env.get("LOCAL_RANK", 0)),
        int(env.get("LOCAL_WORLD_SIZE", world_size)),
        "RANK" in env,
    )


def select_device(backend: str, local_rank: int) -> torch.device:
    """This rank's device, chosen before it joins: under NCCL its own GPU, cuda:local_rank, made current
    (NCCL wants one GPU per rank, and the tensors of its collectives there); the CPU otherwise."""
    if backend != "nccl":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _frame(payload: bytes) -> bytes:
    """payload preceded by its length, as it goes through a pipe."""
    return _HEADER.pack(len(payload)) + payload


def _read_frame(pipe):
    """The next length-prefixed payload from a binary file object, or None if it ends before one is whole."""
    header = pipe.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    payload = pipe.read(size)
    return payload if len(payload) == size else None


def _check_importable(fn):
    """Children find fn by its module and name: fail early, clearly, if they cannot."""
    main_has_file = hasattr(sys.modules.get("__main__"), "__file__")
    name = getattr(fn, "__qualname__", "")
    if "<" in name or (getattr(fn, "__module__", None) == "__main__" and not main_has_file):
        raise ValueError(
            f"run_processes needs a function the child processes can import, but {name or fn!r} "
            f"is defined in a notebook cell, inside a function or as a lambda: define it at "
            f"module level in a .py file and import it"
        )


class _UnguardedCall(RuntimeError):
    """run_processes called by the top-level code of a main script that a child is running."""


def _check_not_loading_main():
    """In a child that runs the parent's script to find fn, that script must not call run_processes again."""
    if _loading_main is not None:
        kind, target = _loading_main
        script = target if kind == "path" else f"the module {target}"
        raise _UnguardedCall(
            f'run_processes was called from the top level of {script}, without an `if __name__ == "__main__":` '
            f"guard. Each child process runs that script's top-level code to find the function it must run, "
            f"so there the call would start processes again, without end. Put the call to run_processes "
            f'(and whatever should run only once) under `if __name__ == "__main__":`'
        )


def _main_to_load(fn):
    """How a child re-creates the parent's __main__ when fn lives there (a script run as `python x.py`)."""
    if getattr(fn, "__module__", None) != "__main__":
        return None
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in (None, "__main__"):
        return ("module", spec.name)  # `python -m package.module`
    return ("path", os.path.abspath(main.__file__))


def _loopback_store(timeout: float):
    """The rendezvous store, listening on 127.0.0.1 alone, on a port the OS picks.

    TCPStore("127.0.0.1", 0, is_master=True) listens on every interface (the host name only says
    where its own client connects), so the socket is bound here and handed to the store, which owns
    it from then on and closes it when it is deleted.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()
    try:
        return dist.TCPStore(
            "127.0.0.1",
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout),
            master_listen_fd=fd,
            use_libuv=_LIBUV_TAKES_A_SOCKET,
        )
    except BaseException:
        os.close(fd)
        raise


# ------------------------------------------------------------------------------- one child process


class _Rank:
    """One child process, started at once: its job written to its stdin, its output and its result
    read by threads."""

    def __init__(self, rank, spec, job, echo):
        self.rank = rank
        self.output = deque(maxlen=_TAIL)  # its last lines, stdout and stderr together
        self.result = None  # the pickled message the rank sent back, once it is whole
        p = spec["world_size"]
        result_r, result_w = os.pipe()  # the rank writes its result into result_w, its own copy
        try:
            env = {
                **os.environ,
                _SPEC_ENV: json.dumps({**spec, "rank": rank, "result_fd": result_w}),
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": str(spec["threads"]),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(p),
                "LOCAL_WORLD_SIZE": str(p),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(spec["port"]),
            }  # torchrun's variables too, for code that reads them
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                pass_fds=(result_w,),
            )
        except BaseException:
            os.close(result_r)
            raise
        finally:
            os.close(result_w)  # the child holds the only copy left
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, sys.stdout if echo else None), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, None), daemon=True),
        ]
        self.receiver = threading.Thread(target=self._receive, args=(result_r,), daemon=True)
        # a large job fills the pipe before the child reads it: write it from a thread, so that the
        # ranks start side by side. stdin stays open: the child exits when it closes.
        self.sender = threading.Thread(target=self._send, args=(job,), daemon=True)
        for t in (*self.readers, self.receiver, self.sender):
            t.start()

    def _read(self, pipe, echo_to):
        for raw in pipe:
            line = raw.decode(errors="replace").rstrip("\n")
            self.output.append(line)
            if echo_to is not None:
                echo_to.write(f"[rank {self.rank}] {line}\n")

    def _send(self, job):
        try:
            self.proc.stdin.write(job)
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass  # the child is gone (or being stopped): poll says why

    def _receive(self, fd):
        with open(fd, "rb") as pipe:
            self.result = _read_frame(pipe)

    def poll(self):
        """None while running; ("ok", value), ("error", kind, traceback) or ("died", exit code)."""
        if self.result is None:
            code = self.proc.poll()
            if code is None:
                return None
            # it may have sent its result, then exited: the end of it is still in the pipe (a rank that
            # exits with 0 always sent one, so give the reading thread time on a loaded machine)
            self.receiver.join(10.0 if code == 0 else _GRACE)
            if self.result is None:
                return ("died", code)
        return pickle.loads(self.result)  # written by this rank's process and no other: see _child_main

    def signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)  # the child and anything it started
        except (ProcessLookupError, PermissionError):
            pass

    def last_output(self) -> str:
        return "\n".join(f"    {line}" for line in self.output)


def _stop(ranks, grace: float = 2.0):
    """SIGTERM every rank's process group, SIGKILL what is left after `grace` seconds, reap all."""
    for r in ranks:
        if r.proc.poll() is None:
            r.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for r in ranks:
        try:
            r.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for r in ranks:
        r.signal_group(signal.SIGKILL)  # also grandchildren that outlived their rank
        r.proc.wait()
    for r in ranks:
        for t in (*r.readers, r.sender, r.receiver):
            t.join(1.0)
        if not r.sender.is_alive():  # (one still writing holds the pipe; it fails once nothing reads it)
            r.proc.stdin.close()
        r.proc.stdout.close()
        r.proc.stderr.close()


# ----------------------------------------------------------------------------- the parent's side


def run_processes(
    fn,
    world_size: int,
    *args,
    backend: str | None = None,
    timeout: float = 60.0,
    collective_timeout: float = 30.0,
    echo: bool = True,
    shm: bool = False,
) -> list:
    """fn(DistGroup(), *args) on world_size new processes; returns each rank's result, in rank order.

    backend None picks `default_backend(world_size)`. Tensors in the results come back on the CPU.
    shm: hand fn a `ShmGroup` instead, whose all-reduces go through shared memory (CPU only).
    `timeout` bounds the whole call (start-up included); `collective_timeout` how long a rank may
    wait inside one collective for the others (at most `timeout`). echo: show what the ranks print.
    Errors: RankError naming the rank that failed or died (see the module docstring), TimeoutError;
    RuntimeError when a script calls it without an `if __name__ == "__main__":` guard.
    """
    _check_not_loading_main()
    _check_importable(fn)
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: it must be a positive integer")
    backend = backend or default_backend(world_size)
    collective_timeout = min(collective_timeout, timeout)
    job = _frame(pickle.dumps((fn, args)))
    store = _loopback_store(timeout)  # the rendezvous only: nothing read from it is unpickled
    spec = dict(
        world_size=world_size,
        port=store.port,
        backend=backend,
        timeout=timeout,
        collective_timeout=collective_timeout,
        sys_path=sys.path,
        main=_main_to_load(fn),
        shm=shm,
        # the ranks share the cores: each gets its share of intra-op threads (as torchrun does),
        # or their thread teams spin against each other and small ops slow down a hundredfold
        threads=max(1, available_cpus() // world_size),
    )
    ranks = []
    try:
        for r in range(world_size):
            ranks.append(_Rank(r, spec, job, echo))
        del job
        return _collect(ranks, timeout, collective_timeout)
    finally:
        _stop(ranks)
        del store


def _collect(ranks, timeout, collective_timeout):
    p, deadline = len(ranks), time.monotonic() + timeout
    done, failed, failed_at = {}, {}, None  # rank -> result; rank -> failure, in the order seen
    while len(done) < p:
        for r in ranks:
            if r.rank not in done and r.rank not in failed:
                event = r.poll()
                if event is not None and event[0] == "ok":
                    done[r.rank] = event[1]
                elif event is not None:
                    failed[r.rank] = event
                    failed_at = failed_at or time.monotonic()
        unguarded = [e for e in failed.values() if e[0] == "error" and e[1] == "unguarded"]
        if unguarded:
            raise RuntimeError(unguarded[0][2])
        if failed:
            causes = [k for k, e in failed.items() if e[0] == "died" or e[1] in ("own", "timeout")]
            # a connection lost inside a collective is usually the echo of another rank's failure:
            # look briefly for that one (its error or exit code may arrive a moment later)
            if causes or len(done) + len(failed) == p or time.monotonic() - failed_at > _GRACE:
                raise _explain(ranks, done, failed, collective_timeout)
        if time.monotonic() > deadline:
            waiting = [r.rank for r in ranks if r.rank not in done]
            raise TimeoutError(
                f"run_processes timed out after {timeout}s: ranks {waiting} of {p} did not finish "
                f"(ranks {sorted(done)} returned). A rank waiting inside a collective fails after "
                f"collective_timeout={collective_timeout}s; one stuck outside any (an endless loop, "
                f"a sleep) is stopped only by this timeout"
            )
        time.sleep(_POLL)
    return [done[r] for r in range(p)]


def _describe(event) -> str:
    if event[0] == "died":
        code = event[1]
        name = signal.Signals(-code).name if code < 0 and -code in signal.valid_signals() else None
        oom = ", which is also how the kernel's out-of-memory killer stops a process" if name == "SIGKILL" else ""
        why = f" ({name}{oom})" if name else ""
        return f"died with exit code {code}{why} before returning a result"
    last = re.sub(r"^(\w+: )\[\S+:\d+\] ", r"\1", event[2].strip().splitlines()[-1])  # drop a C++ file:line
    what = {"own": "raised", "comm": "failed in a collective", "timeout": "timed out in a collective"}[event[1]]
    return f"{what} ({last})"


def _explain(ranks, done, failed, collective_timeout) -> RankError:
    """One RankError about the likeliest cause: a rank that died, then one that raised by itself."""
    order = {"died": 0, "own": 1, "timeout": 2, "comm": 3}
    cause = min(
        failed, key=lambda k: (order[failed[k][0] if failed[k][0] == "died" else failed[k][1]], list(failed).index(k))
    )
    event, p = failed[cause], len(ranks)
    if event[0] == "died":
        text = f"rank {cause} of {p} {_describe(event)}"
        for t in ranks[cause].readers:  # its last words (a crash report) may still be in the pipe
            t.join(1.0)
        tail = ranks[cause].last_output()
        text += f"; its last output:\n{tail}" if tail else "; it printed nothing"
    elif event[1] == "own":
        text = f"rank {cause} of {p} failed:\n{event[2]}"
    elif event[1] == "timeout":
        text = (
            f"rank {cause} of {p} timed out after collective_timeout={collective_timeout}s waiting in a "
            f"collective that the other ranks did not join; every rank must call the same collectives in "
            f"the same order:\n{event[2]}"
        )
    else:
        text = f"rank {cause} of {p} failed in a collective:\n{event[2]}"
    others = []
    for r in ranks:
        if r.rank == cause:
            continue
        if r.rank in done:
            others.append(f"rank {r.rank} had returned its result")
        elif r.rank in failed:
            others.append(f"rank {r.rank} {_describe(failed[r.rank])}")
        else:
            others.append(f"rank {r.rank} was still running and was stopped")
    if others:
        text += "\nThe other ranks: " + "; ".join(others) + "."
    if event[0] != "died" and event[1] == "comm" and done:
        text += (
            f"\nRanks {sorted(done)} returned while rank {cause} was in a collective: did they skip a "
            f"collective that it was waiting in?"
        )
    return RankError(cause, text)


# ------------------------------------------------------------------------------ the child's side


def _failure_kind(exc) -> str:
    """'timeout' or 'comm' for errors of the communication layer, 'own' for the rank's own errors."""
    if isinstance(exc, _UnguardedCall):
        return "unguarded"
    text = str(exc)
    comm = isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError)
        and any(
            s in text
            for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "ProcessGroup", "ShmGroup")
        )
    )
    if not comm:
        return "own"
    return "timeout" if "Timed out" in text or "timed out" in text else "comm"


def _exit_with_parent():
    """Block on stdin, a pipe from the parent: end of file means the parent is gone, so go too."""
    sys.stdin.buffer.read()
    os._exit(70)


def _load_main(kind, target):
    """Run the parent's main script as module __mp_main__, also seen as __main__ (as multiprocessing does)."""
    global _loading_main
    import runpy
    import types

    _loading_main = (kind, target)  # a call of run_processes meanwhile comes from the script's top level
    try:
        namespace = (
            runpy.run_path(target, run_name="__mp_main__")
            if kind == "path"
            else runpy.run_module(target, run_name="__mp_main__", alter_sys=False)
        )
    finally:
        _loading_main = None
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(namespace)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def _child_main():
    """The body of a child process: read the job, rendezvous, run fn, send back its result or its error."""
    import faulthandler

    faulthandler.enable()  # a crash prints the Python traceback to stderr, which the parent keeps
    spec = json.loads(os.environ.pop(_SPEC_ENV))
    rank, world_size = spec["rank"], spec["world_size"]
    os.set_inheritable(spec["result_fd"], False)  # this process's alone: not for what fn starts
    results = os.fdopen(spec["result_fd"], "wb")
    job = _read_frame(sys.stdin.buffer)  # from the parent, through the pipe it holds: no one else can write it
    if job is None:
        os._exit(70)  # the parent died before it sent the whole job
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    torch.set_num_threads(spec["threads"])
    store = dist.TCPStore("127.0.0.1", spec["port"], is_master=False, timeout=timedelta(seconds=spec["timeout"]))
    ok = False
    try:
        if spec["main"]:
            _load_main(*spec["main"])
        fn, args = pickle.loads(job)
        del job
        select_device(spec["backend"], rank)  # one machine: the local rank is the rank
        # start-up may take up to `timeout` (ranks start at different times); the collectives of fn run
        # on a group of all ranks whose every wait is bounded by collective_timeout
        dist.init_process_group(
            spec["backend"], store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=spec["timeout"])
        )
        group = dist.new_group(list(range(world_size)), timeout=timedelta(seconds=spec["collective_timeout"]))
        value = fn(ShmGroup(group, timeout=spec["collective_timeout"]) if spec["shm"] else DistGroup(group), *args)
        # plain pickle copies tensor data into bytes (no shared memory that dies with this process)
        message = pickle.dumps(("ok", _to_cpu(value)))
        ok = True
    except BaseException as exc:  # noqa: B902 - sent to the parent, which raises it
        kind = _failure_kind(exc)
        message = pickle.dumps(("error", kind, str(exc) if kind == "unguarded" else traceback.format_exc()))
    results.write(_frame(message))
    results.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    if ok:
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(0)
    # After an error, wait for the parent to stop this process (it does so at once). Exiting now would
    # close this rank's connections: a rank waiting for it in a collective would fail too ("Connection
    # closed"), and be reported so instead of as still running; tearing the group down could hang.
    while True:
        time.sleep(60)
