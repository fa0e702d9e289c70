"""xenctl up / down composed over xapisim. The deploy and smoke phases need xenctl.deploy (the
Ansible part) and lab hosts; here they are skipped explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from xenctl_helpers import fleet_state, sim_spec

from xapisim import SimServer
from xenctl.cli import cli
from xenctl.errors import XenctlError
from xenctl.spec import Secret
from xenctl.up import PhaseError, down, up


def test_up_sim_runs_the_phases_and_leaves_nothing(tmp_path: Path) -> None:
    inv = tmp_path / "hosts.yml"
    out = CliRunner().invoke(cli, ["up", "--sim", "--sim-backend", "memory", "--nodes", "4",
                                   "--inventory", str(inv)])
    assert out.exit_code == 1 and "no hosts to deploy to" in out.output
    out = CliRunner().invoke(cli, ["up", "--sim", "--sim-backend", "memory", "--nodes", "4",
                                   "--skip", "deploy,smoke", "--inventory", str(inv)])
    assert out.exit_code == 2, out.output
    assert "pool       changed" in out.output and "deploy     skipped" in out.output
    doc = yaml.safe_load(inv.read_text())
    assert len(doc["all"]["children"]["nodes"]["hosts"]) == 4


def test_up_resumes_and_down_removes_the_fleet(sim: SimServer, tmp_path: Path) -> None:
    spec = sim_spec(sim, **{"nodes.count": 3})
    pw = Secret(sim.password)
    inv = tmp_path / "hosts.yml"
    lines: list[str] = []
    res = up(spec, pw, inventory_path=inv, skip={"deploy", "smoke"}, progress=lines.append)
    assert res.changed and [p.name for p in res.phases if p.changed] == ["pool", "nodes", "inventory"]
    again = up(spec, pw, inventory_path=inv, skip={"deploy", "smoke"}, progress=lines.append)
    assert not again.changed  # a re-run resumes: finished phases are no-ops
    bad = sim_spec(sim, **{"nodes.count": 5, "nodes.template": "no such template"})
    with pytest.raises(PhaseError, match="phase 'nodes' failed: nodes.template: no template") as exc:
        up(bad, pw, inventory_path=inv, skip={"deploy", "smoke"}, progress=lines.append)
    assert "run the same command again" in str(exc.value)
    with pytest.raises(XenctlError, match="unknown phase"):
        up(spec, pw, skip={"bogus"})
    res = down(spec, pw, inventory_path=inv, progress=lines.append)
    assert res.changed and fleet_state(sim)["fleet"] == {}
    assert yaml.safe_load(inv.read_text())["all"]["children"]["nodes"]["hosts"] == {}


@pytest.mark.lab
@pytest.mark.parametrize("nodes", [2, pytest.param(30, marks=pytest.mark.slow)])
def test_up_sim_lab_backend_nodes_are_real_ssh_hosts(tmp_path: Path, nodes: int) -> None:
    """The fleet on xapisim's lab backend: each node VM is a lab host with sshd; the inventory
    xenctl writes reaches it over real SSH with the lab's key."""
    import subprocess

    from xenctl.sim import sim_cloud

    inv = tmp_path / "hosts.yml"
    with sim_cloud(nodes, backend="lab") as sc:
        res = up(sc.spec, sc.password, inventory_path=inv, skip={"deploy", "smoke"},
                 progress=lambda _m: None, deploy=sc.deploy)
        assert res.changed
        doc = yaml.safe_load(inv.read_text())["all"]["children"]
        hosts = {**doc["nodes"]["hosts"], **doc["workstation"]["hosts"]}
        assert sorted(hosts) == [f"node-{i:02d}" for i in range(1, nodes + 1)] + ["workstation"]
        per_host = [hv["xen_host"] for hv in doc["nodes"]["hosts"].values()]
        assert max(map(per_host.count, set(per_host))) - min(map(per_host.count, set(per_host))) <= 1
        for name, hv in hosts.items():
            out = subprocess.run(
                ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                 "-o", f"UserKnownHostsFile={sc.deploy.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                 "-i", hv["ansible_ssh_private_key_file"], f"{hv['ansible_user']}@{hv['ansible_host']}",
                 "hostname"], capture_output=True, text=True, timeout=30, check=False)
            assert out.returncode == 0, (name, out.stderr)
        lab = sc.sim.backend.lab
        prefix = lab.prefix
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                        text=True, check=True).stdout  # nothing left behind


@pytest.mark.lab
@pytest.mark.slow
def test_up_sim_full_chain_then_second_run_changes_nothing(tmp_path: Path) -> None:
    """pool -> nodes -> inventory -> ansible-playbook site.yml -> smoke (upload + fetch back),
    on lab hosts; the second run resumes everything with no change."""
    pytest.importorskip("xenctl.deploy")
    from xenctl.sim import sim_cloud

    inv = tmp_path / "hosts.yml"
    with sim_cloud(5, backend="lab") as sc:
        first = up(sc.spec, sc.password, inventory_path=inv, progress=lambda _m: None,
                   deploy=sc.deploy)
        states = {p.name: p for p in first.phases}
        assert all(states[n].changed for n in ("pool", "nodes", "inventory", "deploy"))
        assert "fetched back byte-identical" in states["smoke"].detail
        second = up(sc.spec, sc.password, inventory_path=inv, progress=lambda _m: None,
                    deploy=sc.deploy)
        assert [p.name for p in second.phases if p.changed] == []
        assert "fetched back byte-identical" in second.phases[-1].detail
