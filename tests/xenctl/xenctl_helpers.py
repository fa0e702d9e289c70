"""Helpers for the xenctl tests (imported by conftest and test modules)."""

from __future__ import annotations

from typing import Any

from xapisim import SimServer
from xenctl.spec import CloudSpec, load_spec

NODE_TEMPLATE = "CentOS 7 (medstream node)"
NODE_NETWORK = "Pool-wide network associated with eth0"
NODE_CIDR = "10.213.128.0/17"  # the memory backend's addresses


def sim_spec(sim: SimServer, **overrides: Any) -> CloudSpec:
    """A spec for ``sim`` verifying TLS against its CA (never --insecure)."""
    hosts = [f"{h.address}:{sim.port}" for h in sim.hosts]
    base: dict[str, Any] = {
        "pool.master": hosts[0], "pool.members": hosts[1:], "pool.tls.ca_file": sim.ca_file,
        "nodes.template": NODE_TEMPLATE, "nodes.network": NODE_NETWORK, "nodes.cidr": NODE_CIDR,
        "nodes.ip_timeout": 30, "nodes.shutdown_timeout": 10,
    }
    base.update(overrides)
    return load_spec(None, env={}, overrides=base)
