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


def fleet_state(sim: SimServer, cloud: str = "medstream") -> dict[str, Any]:
    """What is in the pool, read through the real SDK: fleet nodes by index, strays, loose disks."""
    s = sim.session()
    try:
        x = s.xenapi
        vms = x.VM.get_all_records()
        hosts = x.host.get_all_records()
        vdis = x.VDI.get_all_records()
        pool = next(iter(x.pool.get_all_records().values()))
        fleet: dict[int, dict[str, Any]] = {}
        strays: list[str] = []
        for rec in vms.values():
            if rec["is_control_domain"] or rec["is_a_template"] and "xenctl-cloud" not in rec["other_config"]:
                continue
            oc = rec["other_config"]
            if oc.get("xenctl-cloud") != cloud:
                strays.append(rec["name_label"])
                continue
            idx = int(oc["xenctl-index"])
            assert idx not in fleet, f"index {idx} twice"
            rec["host_name"] = hosts.get(rec["resident_on"], {}).get("name_label", "")
            fleet[idx] = rec
        loose = sorted(r["uuid"] for r in vdis.values() if not r["VBDs"])
        journal = {k: v for k, v in pool["other_config"].items() if k.startswith("xenctl-")}
        return {"fleet": fleet, "strays": strays, "loose_vdis": loose, "journal": journal}
    finally:
        s.xenapi.session.logout()
