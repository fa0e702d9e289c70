"""``--sim`` wiring: a throwaway pool on xapisim for ``xenctl up --sim``.

The only module of xenctl that imports ``xapisim`` (and, through its lab backend, ``labnet``).
Everything it starts is stopped when the context exits, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from .spec import CloudSpec, GiB, Secret, load_spec
from .up import DeployOptions

__all__ = ["SimCloud", "sim_cloud"]

TEMPLATE = "CentOS 7 (medstream node)"
NETWORK = "Pool-wide network associated with eth0"
MEMORY_CIDR = "10.213.128.0/17"  # the memory backend's guest addresses


@dataclass
class SimCloud:
    spec: CloudSpec
    password: Secret
    deploy: DeployOptions
    sim: Any


@contextmanager
def sim_cloud(nodes: int, *, backend: str = "memory", hosts: int = 3,
              cloud: str = "medstream") -> Iterator[SimCloud]:
    """Start xapisim with ``hosts`` standalone hosts sized for ``nodes`` 1 GiB nodes."""
    from xapisim import SimConfig, SimServer

    per_host = -(-max(nodes, 1) // hosts)
    memory = (per_host * 1088 // 1024 + 3) * GiB  # nodes + overhead + dom0 + headroom
    sim = SimServer(SimConfig(hosts=hosts, backend=backend, host_memory=memory, sync_interval=5.0))

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        sim.start()
        deploy = DeployOptions()
        cidr = MEMORY_CIDR
        workstation = ""
        key = None
        if backend == "lab":
            be: Any = sim.backend  # xapisim.backends.lab.LabBackend
            cidr = str(be.lab.subnet)
            ws = be.add_extra_host("workstation")
            workstation = str(ws.ip)
            key = be.private_key
            deploy = DeployOptions(ssh_config=be.ssh_config, private_key=be.private_key,
                                   known_hosts=getattr(be, "known_hosts", None))
        addrs = [f"{h.address}:{sim.port}" for h in sim.hosts]
        spec = load_spec(None, env={}, overrides={
            "cloud": cloud, "pool.master": addrs[0], "pool.members": addrs[1:],
            "pool.tls.ca_file": sim.ca_file, "nodes.count": nodes, "nodes.template": TEMPLATE,
            "nodes.network": NETWORK, "nodes.cidr": cidr, "nodes.ssh_private_key": key,
            "workstation.address": workstation or None, "workstation.ssh_private_key": key,
            "nodes.ip_timeout": 300,
        })
        yield SimCloud(spec, Secret(sim.password), deploy, sim)
    finally:
        try:
            sim.stop()
        finally:
            signal.signal(signal.SIGTERM, previous)
