"""scale-nodes against xapisim through the real XenAPI SDK."""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from xenctl_helpers import NODE_CIDR, fleet_state, sim_spec

from xapisim import SimServer
from xenctl.cli import cli
from xenctl.errors import PlanError
from xenctl.nodes import scale_nodes
from xenctl.session import CallStats, connect, is_read_only
from xenctl.spec import Secret

REPO = Path(__file__).resolve().parents[2]
CIDR = ipaddress.ip_network(NODE_CIDR)
READ_ONLY_OK = {"session.logout"}


def per_host(state: dict[str, Any]) -> dict[str, int]:
    return dict(collections.Counter(r["host_name"] for r in state["fleet"].values()))


def scale(sim: SimServer, n: int, **kw: Any) -> Any:
    spec = sim_spec(sim, **kw.pop("spec", {}))
    x = connect(spec.pool, Secret(sim.password), stats=kw.pop("stats", None))
    try:
        return scale_nodes(x, spec, n, **kw)
    finally:
        x.logout()


def test_scale_0_30_5_0_spread_evenly(pool3: SimServer) -> None:
    baseline = fleet_state(pool3)
    res = scale(pool3, 30)
    assert res.changed and not res.failures
    st = fleet_state(pool3)
    assert sorted(st["fleet"]) == list(range(1, 31))
    assert per_host(st) == {"host-1": 10, "host-2": 10, "host-3": 10}
    assert all(r["power_state"] == "Running" for r in st["fleet"].values())
    assert all(ipaddress.ip_address(n.ip) in CIDR for n in res.nodes) and len(res.nodes) == 30
    assert all(r["memory_static_max"] == str(1024**3) and r["VCPUs_max"] == "1"
               for r in st["fleet"].values())
    assert res.calls / 30 <= 15, res.call_counts
    # a re-run changes nothing and makes no mutating call
    stats = CallStats()
    again = scale(pool3, 30, stats=stats)
    assert not again.changed
    assert [m for m in stats.counts if not is_read_only(m) and m not in READ_ONLY_OK] == []
    res = scale(pool3, 5)
    st = fleet_state(pool3)
    assert sorted(st["fleet"]) == [1, 2, 3, 4, 5]  # the highest indexes went
    counts = per_host(st)
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 3
    scale(pool3, 0)
    st = fleet_state(pool3)
    assert st["fleet"] == {} and st["strays"] == baseline["strays"]
    assert st["loose_vdis"] == baseline["loose_vdis"]  # every node's disk destroyed with it
    assert st["journal"] == {}


def test_dry_run_prints_plan_and_makes_no_mutating_call(pool3: SimServer, tmp_path: Path) -> None:
    spec_env = {"XENCTL_PASSWORD": pool3.password, "XENCTL_CA_FILE": pool3.ca_file,
                "XENCTL_TEMPLATE": "CentOS 7 (medstream node)",
                "XENCTL_NETWORK": "xenbr0", "XENCTL_CIDR": NODE_CIDR}
    master = f"{pool3.hosts[0].address}:{pool3.port}"
    out = CliRunner().invoke(cli, ["--master", master, "scale-nodes", "4", "--dry-run"],
                             env=spec_env)
    assert out.exit_code == 0, out.output
    assert "create   node-04 on host-" in out.output
    assert fleet_state(pool3)["fleet"] == {}
    stats = CallStats()
    res = scale(pool3, 4, dry_run=True, stats=stats)
    assert len(res.plan.of("create")) == 4
    assert [m for m in stats.counts if not is_read_only(m) and m not in READ_ONLY_OK] == []
    # and for real, through the CLI: exit 2 changed, then 0 unchanged
    out = CliRunner().invoke(cli, ["--master", master, "scale-nodes", "4"], env=spec_env)
    assert out.exit_code == 2, out.output
    out = CliRunner().invoke(cli, ["--master", master, "scale-nodes", "4"], env=spec_env)
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(cli, ["--master", master, "inventory", "--list"], env=spec_env)
    assert out.exit_code == 0, out.output
    inv = json.loads(out.output)
    assert inv["nodes"]["hosts"] == ["node-01", "node-02", "node-03", "node-04"]
    hv = inv["_meta"]["hostvars"]["node-03"]
    assert ipaddress.ip_address(hv["ansible_host"]) in CIDR
    assert hv["medstream_node_index"] == 3 and hv["xen_host"].startswith("host-")
    out = CliRunner().invoke(cli, ["--master", master, "inventory", "--host", "node-02"],
                             env=spec_env)
    assert json.loads(out.output)["medstream_node_name"] == "node-02"
    target = tmp_path / "inventory" / "hosts.yml"
    out = CliRunner().invoke(cli, ["--master", master, "inventory", "--write", str(target)],
                             env=spec_env)
    assert out.exit_code == 2, out.output
    doc = yaml.safe_load(target.read_text())
    nodes = doc["all"]["children"]["nodes"]["hosts"]
    assert list(nodes) == ["node-01", "node-02", "node-03", "node-04"]
    assert nodes["node-04"]["ansible_host"] == inv["_meta"]["hostvars"]["node-04"]["ansible_host"]
    out = CliRunner().invoke(cli, ["--master", master, "inventory", "--write", str(target)],
                             env=spec_env)
    assert out.exit_code == 0 and "(unchanged)" in out.output


def test_memory_shortfall_refused_before_anything_is_created(pool3: SimServer) -> None:
    stats = CallStats()
    with pytest.raises(PlanError) as exc:
        scale(pool3, 60, stats=stats)
    msg = str(exc.value)
    assert "cannot hold 60 more node(s)" in msg and "short by" in msg and "host-1" in msg
    assert [m for m in stats.counts if not is_read_only(m) and m not in READ_ONLY_OK] == []
    assert fleet_state(pool3)["fleet"] == {}


def test_faults_survived(pool3: SimServer) -> None:
    f = pool3.faults
    busy = f.fail("VM.clone", code="TOO_MANY_PENDING_TASKS", nth=2)
    busy2 = f.fail("VM.start_on", code="TOO_MANY_PENDING_TASKS", nth=3)
    drop_read = f.drop_connection("VM.get_all_records", nth=1)
    drop_events = f.drop_connection("event.from", nth=3)
    drop_write = f.drop_connection("VM.provision", nth=2)  # mutating: node rebuilt, not re-sent
    res = scale(pool3, 6)
    assert not res.failures, res.failures
    for rule in (busy, busy2, drop_read, drop_events, drop_write):
        assert rule.fired == 1, rule
    st = fleet_state(pool3)
    assert sorted(st["fleet"]) == [1, 2, 3, 4, 5, 6]
    assert all(r["power_state"] == "Running" for r in st["fleet"].values())
    assert st["strays"] == [] and st["journal"] == {}
    baseline_loose = fleet_state(pool3)["loose_vdis"]
    # guests that do not shut down cleanly are hard-shut-down, then destroyed with their disks
    refuse = f.fail("VM.clean_shutdown", code="VM_LACKS_FEATURE", params=["OpaqueRef:NULL"], nth=0)
    stats = CallStats()
    res = scale(pool3, 0, stats=stats)
    assert not res.failures and refuse.fired == 6
    assert stats.counts["Async.VM.hard_shutdown"] == 6 and stats.counts["VDI.destroy"] == 6
    assert fleet_state(pool3)["fleet"] == {}
    assert fleet_state(pool3)["loose_vdis"] == baseline_loose


def _xenctl_proc(sim: SimServer, n: int, workdir: Path, *extra: str,
                 **env_extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XENCTL_", "XENSERVER_"))}
    env.update({"XENCTL_PASSWORD": sim.password, "XENCTL_CA_FILE": sim.ca_file,
                "XENCTL_TEMPLATE": "CentOS 7 (medstream node)", "XENCTL_NETWORK": "xenbr0",
                "XENCTL_CIDR": NODE_CIDR, "PYTHONUNBUFFERED": "1", **env_extra})
    return subprocess.Popen(
        [sys.executable, "-m", "xenctl.cli", "-vv", "--master",
         f"{sim.hosts[0].address}:{sim.port}", "scale-nodes", str(n), "--concurrency", "4",
         *extra],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen[str], needle: str, count: int, timeout: float) -> list[str]:
    lines: list[str] = []
    seen = 0
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            seen += 1
            if seen >= count:
                return lines
    raise AssertionError(f"never saw {count}x {needle!r}: {''.join(lines)}")


def _sigkill_after(proc: subprocess.Popen[str], needle: str, count: int) -> None:
    """SIGKILL a running xenctl once its output has shown ``needle`` ``count`` times."""
    try:
        _read_until(proc, needle, count, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.parametrize(("needle", "count"), [("cloning", 3), ("starting on", 2),
                                               ("waiting for IP", 3)])
def test_killed_mid_scale_then_rerun_converges_without_orphans(
        make_sim: Any, tmp_path: Path, needle: str, count: int) -> None:
    sim = make_sim(latency={"delays": {"VM.clone": 0.4, "VM.start_on": 0.6, "guest_ip": 1.0}})
    from xenctl.pool import pool_create
    pool_create(sim_spec(sim).pool, Secret(sim.password))
    baseline = fleet_state(sim)
    _sigkill_after(_xenctl_proc(sim, 8, tmp_path), needle, count)
    killed = fleet_state(sim)
    assert len(killed["fleet"]) + len(killed["strays"]) < 8 or killed["journal"]
    res = scale(sim, 8)
    assert not res.failures
    st = fleet_state(sim)
    assert sorted(st["fleet"]) == list(range(1, 9))
    assert all(r["power_state"] == "Running" and not r["is_a_template"]
               for r in st["fleet"].values())
    assert st["strays"] == baseline["strays"]  # no orphan VM
    assert st["journal"] == {}
    scale(sim, 0)
    assert fleet_state(sim)["loose_vdis"] == baseline["loose_vdis"]  # no orphan disk


def test_password_never_in_process_table_or_logs(pool3: SimServer, tmp_path: Path) -> None:
    proc = _xenctl_proc(pool3, 3, tmp_path)
    seen_cmdlines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            # everyone's view of the process: /proc/PID/cmdline (what ps shows)
            for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if "xenctl" in cmd:
                    seen_cmdlines.append(cmd)
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 2, out
    assert any("scale-nodes" in c for c in seen_cmdlines)
    assert not any(pool3.password in c for c in seen_cmdlines)
    assert "node-03" in out and "XenAPI calls" in out  # -vv logs and progress were produced
    assert pool3.password not in out


def test_default_template_gets_sized_provisioned_and_a_vif(pool3: SimServer) -> None:
    """A stock template: 2 vCPUs, no VIF, a provision spec with sr="" (as shipped)."""
    stats = CallStats()
    res = scale(pool3, 2, stats=stats, spec={"nodes.template": "Other install media",
                                             "nodes.memory": "1536MiB", "nodes.vcpus": 1})
    assert not res.failures, res.failures
    st = fleet_state(pool3)
    for rec in st["fleet"].values():
        assert rec["VCPUs_max"] == "1" and rec["VCPUs_at_startup"] == "1"
        assert rec["memory_dynamic_max"] == str(1536 * 1024**2)
        assert rec["memory_static_max"] == str(1536 * 1024**2)
        assert len(rec["VIFs"]) == 1 and len(rec["VBDs"]) == 1
        assert "disks" not in rec["other_config"]  # provisioned
    assert stats.counts["VIF.create"] == 2 and stats.counts["VM.set_memory_limits"] == 2
    assert stats.counts["VM.set_VCPUs_at_startup"] == 2
    scale(pool3, 0, spec={"nodes.template": "Other install media"})
    assert fleet_state(pool3)["fleet"] == {}


def test_ip_never_in_cidr_times_out_and_the_half_built_node_is_destroyed(pool3: SimServer) -> None:
    baseline = fleet_state(pool3)
    res = scale(pool3, 2, spec={"nodes.cidr": "192.0.2.0/24", "nodes.ip_timeout": 2})
    assert len(res.failures) == 2
    assert all("timed out after 2s waiting for node-0" in f.error and "192.0.2.0/24" in f.error
               for f in res.failures)
    st = fleet_state(pool3)
    assert st["fleet"] == {} and st["strays"] == baseline["strays"] and st["journal"] == {}
    assert st["loose_vdis"] == baseline["loose_vdis"]
    runner = CliRunner().invoke(cli, [
        "--master", f"{pool3.hosts[0].address}:{pool3.port}", "scale-nodes", "1"],
        env={"XENCTL_PASSWORD": pool3.password, "XENCTL_CA_FILE": pool3.ca_file,
             "XENCTL_TEMPLATE": "CentOS 7 (medstream node)", "XENCTL_CIDR": "192.0.2.0/24",
             "XENCTL_IP_TIMEOUT": "1"})
    assert runner.exit_code == 1
    assert "xenctl: error: 1 node(s) failed; rerun to converge" in runner.output


def test_killed_mid_scale_down_then_rerun_leaves_no_orphan(make_sim: Any, tmp_path: Path) -> None:
    """Scale-down killed (SIGKILL by PID) between shutdowns and destroys: the re-run removes
    the rest, and no VM or disk of the fleet is left."""
    sim = make_sim(latency={"delays": {"VM.clean_shutdown": 0.5, "VM.hard_shutdown": 0.2}})
    from xenctl.pool import pool_create
    pool_create(sim_spec(sim).pool, Secret(sim.password))
    baseline = fleet_state(sim)
    assert not scale(sim, 8).failures
    _sigkill_after(_xenctl_proc(sim, 2, tmp_path, "--yes"), "shutting down", 5)
    killed = fleet_state(sim)
    assert 2 < len(killed["fleet"]) < 8  # some removed, some not
    res = scale(sim, 2)
    assert res.changed and not res.failures
    st = fleet_state(sim)
    assert sorted(st["fleet"]) == [1, 2]  # the highest indexes went
    assert all(r["power_state"] == "Running" for r in st["fleet"].values())
    scale(sim, 0)
    st = fleet_state(sim)
    assert st["fleet"] == {} and st["strays"] == baseline["strays"]
    assert st["loose_vdis"] == baseline["loose_vdis"] and st["journal"] == {}


def test_sigint_stops_waiting_at_once_and_rerun_converges(pool3: SimServer, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the xenctl PID) while nodes wait for an IP that never comes (wrong
    CIDR, 300 s timeout): xenctl stops at once with a clear message and exit 1; the re-run with
    the right CIDR converges with no orphan."""
    baseline = fleet_state(pool3)
    proc = _xenctl_proc(pool3, 6, tmp_path, XENCTL_CIDR="192.0.2.0/24", XENCTL_IP_TIMEOUT="300")
    try:
        _read_until(proc, "waiting for IP", 2, timeout=60)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)  # without the abort this would wait 300 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 1, out
    assert "xenctl: error: interrupted" in out and "run the same command again" in out
    assert "Traceback" not in out
    res = scale(pool3, 6)
    assert not res.failures, res.failures
    st = fleet_state(pool3)
    assert sorted(st["fleet"]) == list(range(1, 7))
    assert all(r["power_state"] == "Running" and not r["is_a_template"]
               for r in st["fleet"].values())
    assert st["strays"] == baseline["strays"] and st["journal"] == {}
    scale(pool3, 0)
    assert fleet_state(pool3)["loose_vdis"] == baseline["loose_vdis"]


def test_dropped_clone_request_is_swept_and_retried(pool3: SimServer) -> None:
    """The connection drops during Async.VM.clone (a mutating call: not re-sent blindly): xenctl
    waits for pending clones, removes any untagged clone of that name, then builds the node."""
    baseline = fleet_state(pool3)
    drop = pool3.faults.drop_connection("VM.clone", nth=2)
    res = scale(pool3, 3)
    assert drop.fired == 1
    assert not res.failures, res.failures
    st = fleet_state(pool3)
    assert sorted(st["fleet"]) == [1, 2, 3]
    assert st["strays"] == baseline["strays"] and st["journal"] == {}


def test_pack_fills_one_host_before_the_next(make_sim: Any) -> None:
    sim = make_sim(host_memory=4 * 1024**3)  # room for 3 one-GiB nodes per host (dom0 uses some)
    from xenctl.pool import pool_create
    pool_create(sim_spec(sim).pool, Secret(sim.password))
    res = scale(sim, 4, spec={"nodes.placement": "pack"})
    assert not res.failures
    counts = sorted(per_host(fleet_state(sim)).values(), reverse=True)
    assert counts[0] >= 2 and len(counts) < 3, counts  # filled one host, did not spread
    with pytest.raises(PlanError, match=r"cannot hold \d+ more node\(s\).*short by"):
        scale(sim, 40, spec={"nodes.placement": "pack"})


def test_bounded_concurrency_and_no_polling(make_sim: Any) -> None:
    """An independent observer (its own SDK session on event.from) sees at most --concurrency
    clone/start tasks pending at once, and more than one (parallel, not serial); xenctl itself
    never polls a task or the guest metrics."""
    import threading

    sim = make_sim(latency={"delays": {"VM.clone": 0.3, "VM.start_on": 0.3, "guest_ip": 0.3}})
    from xenctl.pool import pool_create
    pool_create(sim_spec(sim).pool, Secret(sim.password))
    observer = sim.session()
    pending: set[str] = set()
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        token = ""
        while not stop.is_set():
            batch = getattr(observer.xenapi.event, "from")(["task"], token, 1.0)
            token = batch["token"]
            for ev in batch["events"]:
                snap = ev.get("snapshot") or {}
                if ev["operation"] != "del" and snap.get("name_label") in (
                        "Async.VM.clone", "Async.VM.start_on") and snap.get("status") == "pending":
                    pending.add(ev["ref"])
                else:
                    pending.discard(ev["ref"])
            peak = max(peak, len(pending))

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    stats = CallStats()
    try:
        res = scale(sim, 9, stats=stats, spec={"nodes.concurrency": 3})
    finally:
        stop.set()
        t.join(timeout=10)
    assert not res.failures
    assert 2 <= peak <= 3, peak
    polling = {m: n for m, n in stats.counts.items() if m in (
        "task.get_status", "task.get_record", "task.get_progress", "VM.get_guest_metrics",
        "VM_guest_metrics.get_networks", "VM_guest_metrics.get_record", "VM.get_power_state")}
    assert polling == {}
    assert res.calls / 9 <= 15, res.call_counts
