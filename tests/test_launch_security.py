"""run_processes unpickles nothing that could come from anyone but its own ranks.

An attacker here is any other process that can reach a port the caller listens on (any local
user, or any host when the port is open on every interface). During a call, a thread of this test
finds every TCP port this process listens on, connects to each as a torch.distributed TCPStore
client and writes crafted pickles under the key names that the launcher used to read pickles from.
Unpickling one would create a marker file. The call must return the ranks' real results, the
marker must not exist, and every listening socket must be on the loopback interface.
"""

import os
import threading
import time
from datetime import timedelta

import psutil
import pytest
import torch.distributed as dist

from tputil.launch import run_processes

pytestmark = pytest.mark.slow  # starts real processes: not in `make test-fast`

LOOPBACK = {"127.0.0.1", "::1"}
# every key name under which a version of the launcher passed pickles through its store
KEYS = ["tputil/job"] + [f"tputil/result/{r}" for r in range(4)]


class Exploit:
    """Unpickling this calls open(path, "w"): the marker file appears if anything unpickles it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def sleep_then_report(group, seconds):
    """Every rank sleeps (so that the call lasts long enough to be attacked), then returns its rank."""
    time.sleep(seconds)
    return ("real result", group.rank, group.world_size)


def _listening(pid):
    me = psutil.Process(pid)
    conns = me.net_connections(kind="tcp") if hasattr(me, "net_connections") else me.connections(kind="tcp")
    return [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]


def _attack(payload, stop, seen, attacked):
    """Until `stop`, write `payload` under every KEYS name into whatever store this process listens on."""
    import pickle

    while not stop.is_set():
        for addr in _listening(os.getpid()):
            seen.add((addr.ip, addr.port))
            for host in ["::1"] if addr.ip == "::1" else ["127.0.0.1", "::1"]:
                try:
                    client = dist.TCPStore(
                        host, addr.port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=1)
                    )
                    for key in KEYS:
                        client.set(key, pickle.dumps(payload))
                    attacked.add(addr.port)
                    del client
                    break
                except Exception:  # noqa: BLE001 - not a store, or gone: try the next one
                    pass
        time.sleep(0.05)


def test_crafted_pickles_written_into_the_store_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    stop, seen, attacked = threading.Event(), set(), set()
    attacker = threading.Thread(target=_attack, args=(Exploit(str(marker)), stop, seen, attacked), daemon=True)
    attacker.start()
    results = error = None
    try:
        results = run_processes(sleep_then_report, 2, 2.5, backend="gloo", timeout=60.0, echo=False)
    except Exception as exc:  # noqa: BLE001 - the marker is checked first: it is what matters
        error = exc
    finally:
        stop.set()
        attacker.join(10.0)
    assert not marker.exists(), (
        f"a pickle written into the launcher's store by another process was unpickled (the call ended with {error!r})"
    )
    assert error is None, f"the call failed instead of returning the ranks' results: {error!r}"
    assert results == [("real result", 0, 2), ("real result", 1, 2)]
    assert attacked, f"the test attacked nothing (listening sockets seen: {seen})"  # the rendezvous store
    exposed = sorted((ip, port) for ip, port in seen if ip not in LOOPBACK)
    assert exposed == [], f"run_processes listened on a non-loopback address: {exposed}"
