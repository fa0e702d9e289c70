"""xenctl up / down composed over xapisim. The deploy and smoke phases need xenctl.deploy (the
Ansible part) and lab hosts; here they are skipped explicitly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from proctree import alive, descendants
from xenctl_helpers import fleet_state, sim_spec

from transfer.placement import place
from xapisim import SimServer
from xenctl.cli import cli
from xenctl.errors import XenctlError
from xenctl.spec import Secret
from xenctl.up import PhaseError, _on_workstation, down, up

PLACEMENT_SCRIPT = r"""
set -eu
d=$(mktemp -d /tmp/placement.XXXXXX)
trap 'rm -rf "$d"' EXIT
transfer synth "$d/in" --slices 16 --rows 64 --cols 64 >/dev/null
transfer upload "$d/in" --no-progress >/dev/null
transfer get "$d/out" --all >/dev/null
(cd "$d/in" && find . -type f -name '*.dcm' -exec sha256sum {} + | cut -d' ' -f1 | sort) > "$d/a"
(cd "$d/out" && find . -type f -name '*.dcm' -exec sha256sum {} + | cut -d' ' -f1 | sort -u) > "$d/b"
if comm -23 "$d/a" "$d/b" | grep -q .; then echo "BYTES-MISSING"; exit 3; fi
echo "BYTES-OK $(wc -l < "$d/a")"
echo LS-JSON
transfer ls --json
"""


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
        # a study from the workstation: every image on the node rendezvous placement chose
        # (asked of the nodes themselves), and every byte back intact
        out = _on_workstation(sc.spec, sc.deploy, PLACEMENT_SCRIPT, "placement check", 300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "BYTES-OK 16" in out.stdout, out.stdout
        held = json.loads(out.stdout.split("LS-JSON", 1)[1])
        names = [f"node-{i:02d}" for i in range(1, 6)]
        assert set(held) <= set(names)
        rows = [(node, r["sop"]) for node, rs in held.items() for r in rs]
        assert len(rows) >= 16 + 8  # this study and the smoke test's
        assert len({n for n, _ in rows}) >= 3  # spread over the nodes
        for node, sop in rows:
            assert place(sop, names, 1) == [node], (sop, node)
        second = up(sc.spec, sc.password, inventory_path=inv, progress=lambda _m: None,
                    deploy=sc.deploy)
        assert [p.name for p in second.phases if p.changed] == []
        assert "fetched back byte-identical" in second.phases[-1].detail


def _lab_of(pid: int) -> str | None:
    for st in Path("/run/medstream-labnet").glob("*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(st.read_text()).get("owner_pid") == pid:
                return st.parent.name
    return None


@pytest.mark.lab
@pytest.mark.parametrize(("sig", "needle", "count"), [
    (signal.SIGTERM, "== nodes", 1),                   # lab hosts booting
    (signal.SIGINT, "deploy: transfer_node :", 3),     # ansible-playbook and its SSH masters live
    (None, "", 0),                                     # runs to the end
], ids=["sigterm-nodes", "sigint-deploy", "completes"])
def test_up_sim_leaves_nothing_behind(tmp_path: Path, sig: signal.Signals | None, needle: str,
                                      count: int) -> None:
    """`xenctl up --sim` as a user runs it, interrupted by a signal to its PID (or not): it
    exits 1 with a clear message (2 when it completes) and leaves no network namespace, lab
    directory, process or file behind (all its temporary files go under a TMPDIR owned here)."""
    tmp = tmp_path / "tmp"
    cwd = tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    started = time.time()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XENCTL_", "XENSERVER_"))}
    env.update({"TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"})
    args = ["--nodes", "2", "--study-slices", "0"] if sig == signal.SIGINT else \
        ["--nodes", "2", "--skip", "deploy,smoke"]
    proc = subprocess.Popen([sys.executable, "-m", "xenctl.cli", "up", "--sim", *args],
                            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: set[tuple[int, str]] = set()
    lines: list[str] = []
    prefix = None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        hits = 0
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            seen |= descendants(proc.pid)
            prefix = prefix or _lab_of(proc.pid)
            if sig is not None and needle in line:
                hits += 1
                if hits >= count:
                    proc.send_signal(sig)
                    break
        out, _ = proc.communicate(timeout=120)
        lines.append(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    text = "".join(lines)
    assert prefix, text
    if sig is None:
        assert proc.returncode == 2, text
        assert "simulated pool removed" in text
    else:
        assert proc.returncode == 1, text
        assert "xenctl: error: interrupted" in text and "torn down" in text, text
    assert "Traceback" not in text, text
    assert any(p for p in seen), "no child process was ever seen"
    deadline = time.monotonic() + 15
    left = seen
    while time.monotonic() < deadline:
        left = alive(seen)
        if not left:
            break
        time.sleep(0.2)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes() for p, _ in left]
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert prefix not in ns
    assert not Path(f"/run/medstream-labnet/{prefix}").exists()
    assert list(tmp.iterdir()) == [] and list(cwd.iterdir()) == []
    assert list(Path("/tmp").glob(f"xenctl-cp-{proc.pid}-*")) == []  # SSH control sockets
    # ansible's default local temp, not used by --sim: ansible-local-<pid> + mkdtemp's 8 random
    # characters. Matched on the exact PID and on this test's time: PIDs are reused, and a bare
    # prefix glob took an old ansible-local-20023... for this run's PID 2002.
    ansible_tmp = Path.home() / ".ansible" / "tmp"
    pids = {str(p) for p, _ in seen}
    left = [d.name for d in ansible_tmp.glob("ansible-local-*")
            if d.name[len("ansible-local-"):-8] in pids and d.stat().st_mtime >= started - 1]
    assert not left, left
    for d in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace")
            assert str(tmp) not in cmd and prefix not in cmd, cmd
            assert f"xenctl-cp-{proc.pid}-" not in cmd, cmd  # an SSH master left running


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_up_sim_30_nodes_end_to_end() -> None:
    """The README's main command with 30 nodes: pool, 30 lab VMs spread over 3 hosts, Ansible to
    all of them, smoke test, a study sent to the nodes; then nothing left behind."""
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    out = subprocess.run([sys.executable, "-m", "xenctl.cli", "up", "--sim", "--nodes", "30",
                          "--study-slices", "90"],
                         capture_output=True, text=True, timeout=1400, check=False)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(ln.split()[:2] == ["deploy", "changed"] and "32 host(s)" in ln for ln in lines), \
        out.stdout[-2000:]
    assert any(ln.split()[:2] == ["smoke", "ok"] for ln in lines), out.stdout[-2000:]
    assert any(ln.split()[:2] == ["study", "changed"] and "90 images" in ln for ln in lines)
    table = [ln.split() for ln in lines if ln.startswith("node-")]
    assert [t[0] for t in table] == [f"node-{i:02d}" for i in range(1, 31)]
    per_host = [t[2] for t in table]
    assert sorted(per_host.count(h) for h in set(per_host)) == [10, 10, 10]  # spread
    # what each node received, as the transfer report says: all 90 images, no node missing out
    received = sum(int(t[3]) for t in table if len(t) > 3)
    assert received == 90, table
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert after <= before, after - before
