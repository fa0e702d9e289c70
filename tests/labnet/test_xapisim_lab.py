"""xapisim's ``lab`` guest backend: VMs that are real lab hosts, driven directly and through the
real XenAPI SDK over the wire."""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import time
from typing import Any

import pytest

from labnet import _sys as lsys
from xapisim import SimConfig, SimServer
from xapisim.backends import GuestSpec, load_backend
from xapisim.backends.lab import LabBackend, sanitize

pytestmark = pytest.mark.lab
GiB = 1024**3
NODE_TEMPLATE = "CentOS 7 (medstream node)"


def _ssh(config: Any, ip: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-F", str(config), ip, *cmd], capture_output=True, text=True,
                          timeout=60)


def _leftovers(prefix: str) -> list[str]:
    return ([n for n in lsys.netns_list() if n.startswith(prefix)]
            + [n for n in lsys.link_names() if n.startswith(prefix)])


class Reporter:
    def __init__(self) -> None:
        self.ips: list[str] = []
        self.event = threading.Event()

    def __call__(self, ip: str) -> None:
        self.ips.append(ip)
        self.event.set()


def _spec(uuid: str, name: str, networks: list[str] | None = None) -> GuestSpec:
    return GuestSpec(vm_uuid=uuid, name_label=name, host_name="host-1", memory_bytes=GiB, vcpus=1,
                     networks=["Pool-wide network associated with eth0"] if networks is None else networks)


def test_sanitize() -> None:
    assert sanitize("Node 01 (medstream)") == "node-01-medstream"
    assert sanitize("***", "vm-1234") == "vm-1234"
    assert len(sanitize("x" * 80)) == 32


def test_backend_lifecycle_directly() -> None:
    backend = load_backend("lab")
    assert isinstance(backend, LabBackend)
    prefix = backend.lab.prefix
    try:
        rep, rep2, rep3 = Reporter(), Reporter(), Reporter()
        backend.start(_spec("uuid-a", "Node 01"), rep)
        backend.start(_spec("uuid-b", "node 01"), rep2)       # same sanitised name: made unique
        backend.start(_spec("uuid-c", "no-vif", networks=[]), rep3)
        assert rep.event.wait(30) and rep2.event.wait(30)
        ip = rep.ips[0]
        assert rep2.ips[0] != ip
        res = _ssh(backend.ssh_config, ip, "hostname; echo disk > /srv/disk")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "node-01"
        assert _ssh(backend.ssh_config, rep2.ips[0], "hostname").stdout.strip() == "node-01-2"
        assert not rep3.event.wait(1.0)                         # no VIF: no address reported
        # shutdown keeps the disk and the address; a second start finds both
        backend.shutdown("uuid-a", hard=False)
        assert backend.host_for("uuid-a") is None
        assert _ssh(backend.ssh_config, ip, "true").returncode != 0
        again = Reporter()
        backend.start(_spec("uuid-a", "Node 01"), again)
        assert again.event.wait(30) and again.ips == [ip]
        assert _ssh(backend.ssh_config, ip, "cat /srv/disk").stdout == "disk\n"
        # destroy removes the disk too
        backend.shutdown("uuid-a", hard=True)
        backend.destroy("uuid-a")
        assert not (backend.lab.dir / "hosts" / "node-01").exists()
        # a workstation that is not a VM
        ws = backend.add_extra_host("workstation")
        assert _ssh(backend.ssh_config, ws.ip, "hostname").stdout.strip() == "workstation"
        assert backend.private_key.exists() and backend.known_hosts.exists()
    finally:
        backend.close()
    assert _leftovers(prefix) == []
    with pytest.raises(Exception, match="closed"):
        backend.start(_spec("uuid-z", "late"), Reporter())


def _new_vm(x: Any, name: str) -> str:
    tmpl = x.VM.get_by_name_label(NODE_TEMPLATE)[0]
    vm: str = x.VM.clone(tmpl, name)
    x.VM.provision(vm)
    return vm


def _wait_ip(x: Any, vm: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gm = x.VM.get_guest_metrics(vm)
        if gm != "OpaqueRef:NULL":
            nets = x.VM_guest_metrics.get_networks(gm)
            if "0/ip" in nets:
                assert nets["0/ipv4/0"] == nets["0/ip"]
                return str(nets["0/ip"])
        time.sleep(0.1)
    raise AssertionError(f"no IP for {vm} after {timeout}s")


def test_started_vm_answers_ssh_over_the_real_sdk() -> None:
    with SimServer(SimConfig(hosts=1, backend="lab", sync_interval=0.0, seed=3)) as sim:
        backend = sim.backend
        assert isinstance(backend, LabBackend)
        prefix = backend.lab.prefix
        x = sim.session("host-1").xenapi
        vm = _new_vm(x, "node-01")
        x.VM.start(vm, False, False)
        ip = _wait_ip(x, vm, 30)
        assert ipaddress.IPv4Address(ip) in backend.lab.subnet
        res = _ssh(backend.ssh_config, ip, "hostname")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "node-01"
        x.VM.clean_shutdown(vm)
        assert x.VM.get_power_state(vm) == "Halted"
        assert _ssh(backend.ssh_config, ip, "true").returncode != 0
        x.VM.destroy(vm)
    assert _leftovers(prefix) == []


@pytest.mark.slow
def test_thirty_lab_vms_start_and_stop_cleanly() -> None:
    with SimServer(SimConfig(hosts=1, backend="lab", sync_interval=0.0, seed=4,
                             host_memory=64 * GiB)) as sim:
        backend = sim.backend
        assert isinstance(backend, LabBackend)
        prefix = backend.lab.prefix
        x = sim.session("host-1").xenapi
        vms = [_new_vm(x, f"node-{i:02d}") for i in range(1, 31)]
        tasks = [x.Async.VM.start(vm, False, False) for vm in vms]
        deadline = time.monotonic() + 120
        while any(x.task.get_status(t) == "pending" for t in tasks):
            assert time.monotonic() < deadline, "VM.start tasks still pending"
            time.sleep(0.2)
        assert [x.task.get_status(t) for t in tasks] == ["success"] * 30
        ips = [_wait_ip(x, vm, 90) for vm in vms]
        assert len(set(ips)) == 30
        script = " & ".join(f"ssh -F {backend.ssh_config} {ip} hostname" for ip in ips) + " & wait"
        names = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
        assert sorted(names.stdout.split()) == [f"node-{i:02d}" for i in range(1, 31)], names.stderr
        for vm in vms:
            x.VM.hard_shutdown(vm)
        assert [x.VM.get_power_state(vm) for vm in vms] == ["Halted"] * 30
        assert [n for n in lsys.netns_list() if n.startswith(prefix)] == []
        for vm in vms:
            x.VM.destroy(vm)
    assert _leftovers(prefix) == []
