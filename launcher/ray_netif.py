"""Ray Train's ``TorchConfig`` with the network interface variables set on every worker before its process group.

Ray Train (https://docs.ray.io/en/latest/train/api/doc/ray.train.torch.TorchConfig.html) starts the process group in
its torch backend's ``on_start``: ``MASTER_ADDR`` is rank 0's node IP, and the interface each rank's gloo/NCCL binds
to is left to torch. This backend first runs :func:`distrib_ft.runtime.netif.configure_worker` on every worker
(GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME: the node's value, else the driver's, else -- when the workers span nodes --
the interface of the node's Ray IP), then Ray Train's own ``on_start``. ``_TorchBackend`` is Ray's (private) class;
checked with Ray 2.60.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from distrib_ft.runtime import netif


class _Backend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        import ray

        ips = worker_group.execute(ray.util.get_node_ip_address)
        worker_group.execute(netif.configure_worker, preset=backend_config.preset, detect=len(set(ips)) > 1)
        super().on_start(worker_group, backend_config)


@dataclass
class NodeAwareTorchConfig(TorchConfig):
    """``TorchConfig`` that sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME on each worker (distrib_ft.runtime.netif)."""

    preset: dict = field(default_factory=netif.driver_preset)  # the driver's values, taken where it is built

    @property
    def backend_cls(self):
        return _Backend
