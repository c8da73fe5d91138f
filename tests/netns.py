"""Two Linux network namespaces joined by one veth pair: two "machines" on one host, for a two-node Ray cluster.

Follows ip-netns(8) and veth(4). The namespaces, and the interface inside each, are this helper's; addresses come
from 198.51.100.0/24 (TEST-NET-2, RFC 5737: documentation addresses, routed nowhere) and nothing outside the pair is
ever reached: the namespaces have no route out, and the root namespace gets no address or route. Each namespace
has its own loopback and its own port space, so fixed ports inside one cannot collide with other jobs on the host.

``two_namespaces()`` yields the pair and, on exit, ends every process still in either namespace (``ip netns pids``:
all of them were started in it by the test) with SIGTERM, then SIGKILL, and deletes the namespaces (the veth pair
goes with them). Commands run inside one with ``ns.exec(argv)`` (``ip netns exec``); Python code of the test
process with ``ns.call(fn)``, in a thread that joined the namespace (setns(2) moves only the calling thread), so its
sockets, and the processes it starts, are in the namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

SUBNET = "198.51.100"  # TEST-NET-2 (RFC 5737); the only addresses this helper ever assigns
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Namespace:
    """A network namespace with one veth end ``ifname`` holding ``ip``/24."""

    name: str
    ip: str
    ifname: str

    def exec(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        """The processes in this namespace."""
        r = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in a thread of this process that joined this namespace; its result or exception."""
        box: dict = {}

        def run():
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {self.name}")
                finally:
                    os.close(fd)
                box["value"] = fn(*args, **kwargs)
            except BaseException as e:  # re-raised in the caller
                box["error"] = e

        t = threading.Thread(target=run, name=f"netns-{self.name}")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None: not root, no ``ip``, or ``ip netns add`` fails."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"dftprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
    except OSError as e:
        return f"cannot make a network namespace: {e}"
    try:
        _ip("-n", name, "link", "add", "dftprobe0", "type", "veth", "peer", "name", "dftprobe1")
    except OSError as e:
        return f"cannot make a veth pair in a network namespace: {e}"
    finally:
        with contextlib.suppress(OSError):
            _ip("-n", name, "link", "del", "dftprobe0")
        with contextlib.suppress(OSError):
            _ip("netns", "del", name)
    return None


def _end(namespaces: list[Namespace], grace: float = 5.0) -> None:
    """SIGTERM every process in ``namespaces``, SIGKILL those left after ``grace`` seconds; wait until none are."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        pids = [p for ns in namespaces for p in ns.pids()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(ns.pids() for ns in namespaces):
            time.sleep(0.2)
        if not any(ns.pids() for ns in namespaces):
            return


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[Namespace, Namespace]]:
    """A head namespace (198.51.100.1 on ``dfth0``) and a worker namespace (198.51.100.2 on ``dftw0``), one veth pair.

    The interfaces have different names on purpose: a node's interface name is its own.
    """
    tag = secrets.token_hex(3)
    head = Namespace(f"dft{tag}h", f"{SUBNET}.1", "dfth0")
    worker = Namespace(f"dft{tag}w", f"{SUBNET}.2", "dftw0")
    made: list[Namespace] = []
    try:
        for ns in (head, worker):
            _ip("netns", "add", ns.name)
            made.append(ns)
        _ip("link", "add", head.ifname, "netns", head.name, "type", "veth", "peer", "name", worker.ifname,
            "netns", worker.name)
        for ns in (head, worker):
            _ip("-n", ns.name, "addr", "add", f"{ns.ip}/24", "dev", ns.ifname)
            _ip("-n", ns.name, "link", "set", ns.ifname, "up")
            _ip("-n", ns.name, "link", "set", "lo", "up")
        yield head, worker
    finally:
        _end(made)
        with contextlib.suppress(OSError):  # one end deletes the pair; then the namespaces
            _ip("-n", head.name, "link", "del", head.ifname)
        for ns in made:
            with contextlib.suppress(OSError):
                _ip("netns", "del", ns.name)
