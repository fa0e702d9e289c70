"""The top-level Vagrantfile on real VMs: 2 nodes and a workstation, deployed and used.

One module-scoped rig: ``vagrant/vm up`` (box from the cache or built, libvirtd started if needed,
machines booted under qemu, then the Ansible provisioner once over all of them with
playbooks/site.yml), then testinfra (tests/infra) against the same machines, an upload from the
workstation VM, and ``vagrant destroy -f`` leaving no domain, network or disk behind.

Timings land in ``$MEDSTREAM_VM_TIMINGS`` (default /var/cache/medstream/vm/timings.json).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from vmrig import PY, ROOT, leftovers, require_rig, run, tail

pytestmark = [pytest.mark.vagrant, pytest.mark.timeout(1800)]

NODES = ["node-01", "node-02"]
MACHINES = ["workstation", *NODES]
CLIENT = "/opt/medstream/venv/bin/transfer"
TIMINGS = Path(os.environ.get("MEDSTREAM_VM_TIMINGS", "/var/cache/medstream/vm/timings.json"))


@dataclass
class Rig:
    env: dict[str, str]
    dir: Path
    log: Path
    up: subprocess.CompletedProcess[str]
    ssh: dict[str, dict[str, str]] = field(default_factory=dict)  # machine -> ssh-config fields
    destroyed: bool = False


def record_timing(key: str, seconds: float) -> None:
    try:
        data = json.loads(TIMINGS.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = {"seconds": round(seconds, 1), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def parse_ssh_config(text: str) -> dict[str, dict[str, str]]:
    hosts: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            continue
        key, value = parts[0].lower(), parts[1].strip().strip('"')
        if key == "host":
            current = hosts.setdefault(value, {})
        elif current is not None:
            current[key] = value
    return hosts


def vm(rig: Rig, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run([str(ROOT / "vagrant" / "vm"), *args], env=rig.env, timeout=timeout, log=rig.log)


def ssh(rig: Rig, machine: str, script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    h = rig.ssh[machine]
    argv = ["ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes",
            "-i", h["identityfile"], "-p", h.get("port", "22"), f"{h['user']}@{h['hostname']}",
            "sudo sh -c " + shlex.quote(script)]
    return run(argv, timeout=timeout, log=rig.log)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_rig()
    d = tmp_path_factory.mktemp("vagrant")
    env = dict(os.environ, MEDSTREAM_VM_NODES=str(len(NODES)),
               VAGRANT_DOTFILE_PATH=str(d / ".vagrant"), MEDSTREAM_STATE_DIR=str(d / "state"))
    log = d / "vm.log"
    t0 = time.monotonic()
    up = run([str(ROOT / "vagrant" / "vm"), "up"], env=env, timeout=1500, log=log)
    the_rig = Rig(env=env, dir=d, log=log, up=up)
    if up.returncode == 0:
        record_timing("vagrant_up_2_nodes_and_workstation_provisioned", time.monotonic() - t0)
        conf = vm(the_rig, "ssh-config", timeout=120)
        the_rig.ssh = parse_ssh_config(conf.stdout)
    try:
        yield the_rig
    finally:
        if not the_rig.destroyed:
            vm(the_rig, "destroy", timeout=600)


def test_vagrant_up_and_provisioner_green(rig: Rig) -> None:
    assert rig.up.returncode == 0, tail(rig.up.stdout + rig.up.stderr)
    recap = dict(re.findall(r"^(\S+)\s+:\s+(ok=.*)$", rig.up.stdout, re.M))
    assert sorted(recap) == sorted(["localhost", *MACHINES]), recap
    for host, line in recap.items():
        counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", line))
        assert counts["failed"] == 0 and counts["unreachable"] == 0, (host, line)
        assert counts["ok"] > 0, (host, line)
    assert sorted(rig.ssh) == sorted(MACHINES)


def test_guests_run_systemd_and_transferd_under_it(rig: Rig) -> None:
    for machine in MACHINES:
        out = ssh(rig, machine, "cat /proc/1/comm; hostname")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["systemd", machine]
    for node in NODES:
        out = ssh(rig, node, "systemctl is-active transferd; systemctl is-enabled transferd; "
                             "test ! -e /run/medstream/transferd.pid && echo no-pidfile")
        assert out.stdout.split() == ["active", "enabled", "no-pidfile"], out.stdout + out.stderr


def test_testinfra_green_against_the_vms(rig: Rig) -> None:
    def hv(machine: str) -> dict[str, object]:
        h = rig.ssh[machine]
        return {"ansible_host": h["hostname"], "ansible_port": int(h.get("port", "22")),
                "ansible_user": h["user"], "ansible_ssh_private_key_file": h["identityfile"],
                "ansible_become": True,
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                **({"medstream_node_name": machine} if machine in NODES else {})}
    inv = {"all": {"children": {"nodes": {"hosts": {n: hv(n) for n in NODES}},
                                "workstation": {"hosts": {"workstation": hv("workstation")}}}}}
    path = rig.dir / "testinfra-hosts.yml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    t0 = time.monotonic()
    out = run([PY, "-m", "pytest", "tests/infra", "--ansible-inventory", str(path), "-q",
               "-p", "no:cacheprovider", "-o", "addopts=-ra --strict-markers"],
              env=dict(os.environ, PATH=f"{Path(PY).parent}:{os.environ.get('PATH', '')}"),
              timeout=900, log=rig.log)
    record_timing("testinfra_against_vms", time.monotonic() - t0)
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    summary = out.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary, summary
    assert "skipped" not in summary, summary  # every check applies to a systemd guest


def test_upload_from_the_workstation_vm_reaches_the_nodes(rig: Rig) -> None:
    script = f"""set -e
    rm -rf /root/smoke && mkdir -p /root/smoke
    {CLIENT} synth /root/smoke/in --slices 12 --rows 64 --cols 64 >/dev/null
    {CLIENT} upload /root/smoke/in --json-report /root/smoke/report.json >/dev/null
    {CLIENT} get /root/smoke/out --all >/dev/null
    a=$(cd /root/smoke/in && find . -type f -exec cat {{}} + | wc -c)
    b=$(find /root/smoke/out -type f -name '*.dcm' | wc -l)
    echo "{{\\"report\\": $(cat /root/smoke/report.json), \\"ls\\": $({CLIENT} ls --json),"
    echo " \\"sent_bytes\\": $a, \\"fetched\\": $b}}"
    """
    out = ssh(rig, "workstation", script, timeout=600)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["report"]["total"]["files"] == 12 and data["report"]["total"]["failed"] == 0
    counts = {node: len(rows) for node, rows in data["ls"].items()}
    assert sorted(counts) == NODES and sum(counts.values()) == 12, counts
    assert data["fetched"] == 12
    # and on the nodes' own disks, as the service user stored them
    on_disk = 0
    for node in NODES:
        got = ssh(rig, node, "find /srv/medstream -type f -name '*.dcm' -user medstream | wc -l")
        assert got.returncode == 0, got.stderr
        on_disk += int(got.stdout.strip())
    assert on_disk == 12


def test_vagrant_destroy_leaves_no_domain_network_or_disk(rig: Rig) -> None:
    t0 = time.monotonic()
    out = vm(rig, "vagrant", "destroy", "-f", timeout=600)
    record_timing("vagrant_destroy", time.monotonic() - t0)
    assert out.returncode == 0, tail(out.stdout + out.stderr)
    left = leftovers()
    assert left["domains"] == [] and left["networks"] == [], left
    pool = Path(os.environ.get("MEDSTREAM_VM_CACHE", "/var/cache/medstream/vm")) / "pool"
    assert sorted(p.name for p in pool.glob("ms7-*")) == []
    stop = vm(rig, "destroy", timeout=300)
    rig.destroyed = True
    assert stop.returncode == 0, tail(stop.stdout + stop.stderr)
    assert leftovers() == {"domains": [], "networks": [], "pools": []}
    state = json.loads(Path("/run/medstream-vm/state.json").read_text())
    assert "libvirtd_pid" not in state and "qemu_conf_patched" not in state, state
