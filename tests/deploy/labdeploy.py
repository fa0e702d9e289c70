"""Helpers for the deploy tests: an Ansible inventory for lab hosts (also usable by hand).

``python tests/deploy/labdeploy.py N [--hold SECONDS]`` creates a lab with a workstation and N
nodes, deploys site.yml twice and prints the timings (the figures in roles/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
N_NODES = 3


@dataclass
class Deployed:
    """A lab deployed by the module fixture in conftest.py."""

    lab: Any
    workstation: Any
    nodes: list[Any]
    inventory: Path
    state: Path
    wheelhouse: Any
    first: Any  # xenctl.deploy.DeployResult of the first run
    progress: list[str]

#: lab hosts share /usr with the machine: no apt/dnf, no links in /usr/local/bin
LAB_VARS: dict[str, Any] = {
    "transfer_node_manage_packages": False,
    "workstation_manage_packages": False,
    "workstation_bin_dir": "",
}


def lab_inventory(lab: Any, workstation: Any, nodes: Sequence[Any],
                  host_vars: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The inventory xenctl would write (docs/INTERFACES.md), for hosts of a ``labnet.Lab``.

    ``host_vars`` adds variables to single hosts (by name).
    """
    extra = host_vars or {}
    common = {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(lab.private_key),
        "ansible_ssh_common_args": f"-F {lab.ssh_config}",
    }
    node_hosts = {
        h.name: {"ansible_host": str(h.ip), "medstream_node_name": h.name,
                 "medstream_node_index": i, **common, **extra.get(h.name, {})}
        for i, h in enumerate(nodes, start=1)
    }
    ws_hosts = {workstation.name: {"ansible_host": str(workstation.ip), **common,
                                   **extra.get(workstation.name, {})}}
    return {"all": {"vars": dict(LAB_VARS),
                    "children": {"nodes": {"hosts": node_hosts},
                                 "workstation": {"hosts": ws_hosts}}}}


def write_inventory(inv: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    from labnet import Lab

    sys.path.insert(0, str(REPO))
    from xenctl.deploy import build_wheelhouse, run_site

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("nodes", type=int)
    ap.add_argument("--hold", type=float, default=0.0, help="keep the lab this long afterwards")
    ap.add_argument("--state-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    with Lab.create() as lab:
        t0 = time.monotonic()
        hosts = lab.add_hosts(["workstation", *[f"node-{i:02d}" for i in range(1, args.nodes + 1)]])
        boot = time.monotonic() - t0
        state = args.state_dir or lab.dir / "state"
        inv = write_inventory(lab_inventory(lab, hosts[0], hosts[1:]), lab.dir / "hosts.yml")
        wh = build_wheelhouse(Path(state) / "wheelhouse")
        first = run_site(inv, state_dir=state, wheelhouse=wh)
        second = run_site(inv, state_dir=state, wheelhouse=wh)
        for name, res in (("first", first), ("no-op", second)):
            slow = sorted(res.task_seconds, key=lambda t: -t[1])[:8]
            print(f"{name}: " + ", ".join(f"{t} {s:.1f}s" for t, s in slow), flush=True)
        print(json.dumps({"nodes": args.nodes, "lab_boot_s": round(boot, 2),
                          "first_s": round(first.seconds, 1), "first": first.summary,
                          "noop_s": round(second.seconds, 1), "noop": second.summary,
                          "noop_changed": second.changed}, indent=2))
        if args.hold:
            print(f"holding {args.hold:.0f}s: ssh -F {lab.ssh_config} node-01", flush=True)
            time.sleep(args.hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
