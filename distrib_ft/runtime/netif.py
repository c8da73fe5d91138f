"""The network interface a worker's collectives use when the workers span nodes: GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME.

Follows torch.distributed's documentation ("Common environment variables": ``GLOO_SOCKET_IFNAME``,
``NCCL_SOCKET_IFNAME``) and Ray Train's ``TorchConfig`` (ray.train.torch.config). What the libraries do by
themselves (Ray 2.60, torch 2.13):

- Ray Train sets ``MASTER_ADDR`` to rank 0's Ray node IP (``ray.util.get_node_ip_address()``, the address given to
  ``ray start --node-ip-address``) and a free port there, then calls ``init_process_group`` on every worker. It
  sets no interface variable (only its Databricks hook does).
- gloo binds each rank to the address the machine's hostname resolves to, and to 127.0.0.1 when that address is not
  on the machine ("Unable to resolve hostname to a (local) address"); each rank advertises that address to the
  others. Where the hostname maps to 127.0.0.1 (/etc/hosts on many hosts, containers among them), ranks on two nodes
  tell each other to connect to 127.0.0.1 and the job fails at start-up: "Gloo connectFullMesh failed ...
  Connection refused, remote=[127.0.0.1]".
- NCCL chooses an interface itself (not ``lo``, not ``docker*``), which can be the wrong one on a node with several.

So, before Ray Train creates the process group, every worker sets each variable that is not already set:
its own environment's value wins (set on a node before ``ray start``: the raylet's environment is its workers'),
then the driver's (``GLOO_SOCKET_IFNAME=... distrib-ft train ... --address ...``: the same name on every node),
then, only when the workers span more than one node, the interface that holds the node's Ray IP. A name that
is not an interface of that node is a one-line error. Workers that share one node: nothing is set.
"""

from __future__ import annotations

import os
import socket
import sys

VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interfaces() -> dict[str, list[str]]:
    """This machine's (this network namespace's) interfaces and their IPv4/IPv6 addresses."""
    import psutil

    return {name: [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
            for name, addrs in psutil.net_if_addrs().items()}


def interface_of(ip: str) -> str | None:
    """The name of the interface that holds ``ip``, or None."""
    return next((name for name, addrs in interfaces().items() if ip in addrs), None)


def node_ip() -> str:
    """This worker's node IP: Ray's (the node's ``--node-ip-address``) in a Ray worker, else the hostname's address."""
    ray = sys.modules.get("ray")  # imported in every Ray worker; not imported for it elsewhere
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def choose(ip: str, preset: dict[str, str], detect: bool) -> dict[str, str]:
    """The interface variables to set in a worker on the node with IP ``ip``.

    Args:
        ip: the node's IP.
        preset: the driver's values of :data:`VARS` (used where the worker's environment has none).
        detect: whether to name the interface that holds ``ip`` where neither has a value.

    Raises:
        ValueError: a value (the worker's, or the driver's) names no interface of this node.
    """
    found, chosen = interfaces(), {}
    for var in VARS:
        value, source = os.environ.get(var), "the node's environment"
        if not value and preset.get(var):
            value, source = preset[var], "the driver's environment"
        if value:
            missing = _missing(var, value, found)
            if missing:
                raise ValueError(f"{var}={value} (from {source}): node {ip} has no network interface "
                                 f"{', '.join(missing)} (it has {', '.join(sorted(found))}); set {var} on each node "
                                 "before `ray start`, or unset it and distrib-ft names the interface of the node's "
                                 "Ray address")
            chosen[var] = value
        elif detect:
            name = interface_of(ip)
            if name is None:
                raise ValueError(f"{var}: node {ip} has no interface with its Ray address {ip} (it has "
                                 f"{', '.join(sorted(found))}); set {var} on each node before `ray start`")
            chosen[var] = name
    return chosen


def _missing(var: str, value: str, found) -> list[str]:
    """The names in ``value`` that match no interface.

    gloo's are exact names; NCCL's are prefixes, exact after ``=``, and exclusions after ``^`` (not checked).
    """
    if value.startswith("^"):
        return []
    exact = var.startswith("GLOO") or value.startswith("=")
    names = [n.strip() for n in value.removeprefix("=").split(",") if n.strip()]
    return [n for n in names if not any(f == n if exact else f.startswith(n) for f in found)]


def configure_worker(preset: dict[str, str], detect: bool) -> dict[str, str]:
    """Set the interface variables in this worker process (before its process group exists); returns them."""
    chosen = choose(node_ip(), preset, detect)
    os.environ.update(chosen)
    return chosen


def driver_preset() -> dict[str, str]:
    """The driver's values of :data:`VARS` (those that are set)."""
    return {var: os.environ[var] for var in VARS if os.environ.get(var)}


def worker_record() -> dict:
    """Where this rank runs: its node IP, host name, process ID and the interface variables it has (summary.json)."""
    return {"node_ip": node_ip(), "hostname": socket.gethostname(), "pid": os.getpid(),
            **{var.lower(): os.environ[var] for var in VARS if os.environ.get(var)}}
