"""The whole product against real VMs: xenctl's phases on xapisim with the libvirt backend, 3 nodes.

xapisim (3 hosts) whose VMs are qemu domains (xapisim.backends.libvirt), a workstation domain, then
xenctl.up: pool, nodes (VM.clone/start; the IP each guest leased reported through guest metrics),
inventory, deploy (playbooks/site.yml over SSH; systemd guests), smoke and a small study uploaded
from the workstation. This goes through xenctl's library with the spec `xenctl up --sim` builds;
`xenctl up --sim --sim-backend libvirt` is the same once the CLI offers that backend.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest
from vmrig import leftovers, require_rig

pytestmark = [pytest.mark.vagrant, pytest.mark.timeout(1500)]

NODES = 3


def test_xenctl_up_on_libvirt_guests(tmp_path: Path) -> None:
    require_rig()
    from xapisim.backends.libvirt import LibvirtDaemons, default_image, virsh
    from xenctl.sim import NETWORK, TEMPLATE, sim_cloud
    from xenctl.spec import load_spec
    from xenctl.up import up

    try:
        default_image()
    except Exception as exc:  # noqa: BLE001 - no image is an environment state
        pytest.skip(f"{exc}")
    lines: list[str] = []
    t0 = time.monotonic()
    with sim_cloud(NODES, backend="libvirt") as sc:
        be: Any = sc.sim.backend
        assert be.name == "libvirt"
        ws = be.add_extra_host("workstation")
        sim = sc.sim
        spec = load_spec(None, env={}, overrides={
            "cloud": sc.spec.cloud, "pool.master": f"{sim.hosts[0].address}:{sim.port}",
            "pool.members": [f"{h.address}:{sim.port}" for h in sim.hosts[1:]],
            "pool.tls.ca_file": sim.ca_file, "nodes.count": NODES, "nodes.template": TEMPLATE,
            "nodes.network": NETWORK, "nodes.cidr": str(be.subnet),
            "nodes.ssh_private_key": be.private_key, "workstation.address": ws.ip,
            "workstation.ssh_private_key": be.private_key, "nodes.ip_timeout": 900,
        })
        sc.deploy.ssh_config = be.ssh_config
        sc.deploy.private_key = be.private_key
        sc.deploy.known_hosts = be.known_hosts
        res = up(spec, sc.password, inventory_path=sc.workdir / "hosts.yml", deploy=sc.deploy,
                 progress=lines.append, study_slices=24)
        inventory = (sc.workdir / "hosts.yml").read_text()
        running = [d for d in virsh("list", "--name").stdout.split() if d.startswith(be.tag + "-")]
    elapsed = time.monotonic() - t0
    print("\n".join(lines + res.summary() + [f"total {elapsed:.0f} s"]))
    phases = {p.name: p for p in res.phases}
    assert [p.name for p in res.phases if not p.skipped] == \
        ["pool", "nodes", "inventory", "deploy", "smoke", "study"], res.summary()
    assert len(res.nodes) == NODES
    for n in res.nodes:
        assert n.ip is not None and ipaddress.IPv4Address(n.ip) in be.subnet, n
        assert f"ansible_host: {n.ip}" in inventory
    assert len(running) == NODES + 1, running  # the nodes and the workstation, as qemu domains
    assert phases["deploy"].changed
    assert res.study["ok"] and res.study["total"]["files"] == 24 and res.study["total"]["failed"] == 0, res.study
    stored = [n for n in res.study.get("nodes", []) if n.get("files")]
    assert len(stored) >= 2, res.study
    # everything the backend made is gone, and the daemons it started are stopped
    assert not be.workdir.exists()
    if LibvirtDaemons.answering():
        left = leftovers()
        assert not [d for d in left["domains"] if d.startswith("ms7-xs-")], left
        assert not [n for n in left["networks"] if n.startswith("ms7-xs-")], left
