"""Fault injection, the latency model and configuration files."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import pytest
from xsim_helpers import event_from, failure, new_vm

from xapisim import ConfigError, SimConfig, SimServer, UnknownHost


def test_fail_nth_call_with_a_real_code() -> None:
    with SimServer(SimConfig(hosts=1, sync_interval=0)) as sim:
        x = sim.session().xenapi
        vms = [new_vm(x, f"f{i}") for i in range(3)]
        rule = sim.faults.fail("VM.start", "HOST_NOT_ENOUGH_FREE_MEMORY", ["1073741824", "0"], nth=2)
        x.VM.start(vms[0], False, False)
        assert failure(x.VM.start, vms[1], False, False) == ["HOST_NOT_ENOUGH_FREE_MEMORY", "1073741824", "0"]
        x.VM.start(vms[2], False, False)
        assert rule.fired == 1 and rule.seen == 3
        # Async calls count under the same name and fail their task
        sim.faults.fail("VM.clone", "SR_BACKEND_FAILURE_44", ["", "There is insufficient space", ""], nth=1)
        tmpl = x.VM.get_by_name_label("CentOS 7")[0]
        task = x.Async.VM.clone(tmpl, "nope")
        deadline = time.monotonic() + 5
        while x.task.get_status(task) == "pending" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert x.task.get_status(task) == "failure"
        assert x.task.get_error_info(task) == ["SR_BACKEND_FAILURE_44", "", "There is insufficient space", ""]
        with pytest.raises(ConfigError, match="NOT_A_CODE"):
            sim.faults.fail("VM.start", "NOT_A_CODE", [])
        with pytest.raises(UnknownHost):
            sim.kill_host("host-9")
        with pytest.raises(ConfigError):
            sim.faults.fail("VM.start", "HOST_NOT_ENOUGH_FREE_MEMORY", ["only-one"])


def test_drop_connection_and_recover() -> None:
    with SimServer(SimConfig(hosts=1, sync_interval=0)) as sim:
        x = sim.session().xenapi
        # one drop: xmlrpc.client retries a cold connection once, so the client never notices
        once = sim.faults.drop_connection("VM.get_all", nth=1)
        assert x.VM.get_all()
        assert once.fired == 1 and once.seen == 2
        sim.faults.clear()
        sim.faults.drop_connection("VM.get_all", nth=0)  # every call
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            x.VM.get_all()
        sim.faults.clear()
        assert x.VM.get_all()  # the transport reconnects


def test_kill_host_on_a_call() -> None:
    with SimServer(SimConfig(hosts=2, sync_interval=0)) as sim:
        x = sim.session("host-1").xenapi
        vm = new_vm(x, "k")
        sim.faults.kill_host("VM.start", host="host-1", nth=1)
        with pytest.raises(OSError):
            x.VM.start(vm, False, False)
        with pytest.raises(OSError):
            sim.session("host-1")
        sim.revive_host("host-1")
        assert sim.session("host-1").xenapi.VM.get_power_state(vm) == "Halted"


def test_latency_model_delays_messages_and_guest_ip() -> None:
    cfg = SimConfig(hosts=1, sync_interval=0, latency={"delays": {"VM.clone": 0.3, "guest_ip": 0.5}})
    with SimServer(cfg) as sim:
        x = sim.session().xenapi
        tmpl = x.VM.get_by_name_label("CentOS 7 (medstream node)")[0]
        t0 = time.monotonic()
        vm = x.VM.clone(tmpl, "slow")
        assert time.monotonic() - t0 >= 0.3
        x.VM.provision(vm)
        token = event_from(x, ["vm_guest_metrics"], "", 0.0)["token"]
        x.VM.start(vm, False, False)
        assert x.VM.get_guest_metrics(vm) == "OpaqueRef:NULL"  # the agent has not reported yet
        result = event_from(x, ["vm_guest_metrics"], token, 10.0)
        assert result["events"] and result["events"][0]["operation"] == "add"
        assert x.VM_guest_metrics.get_networks(x.VM.get_guest_metrics(vm))["0/ip"]


def test_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "sim.yml"
    cfg_file.write_text(
        "hosts: 2\n"
        "sync_interval: 0\n"
        "host_memory: 4294967296\n"
        "latency:\n  profile: none\n  delays: {VM.clone: 0.05}\n"
        "faults:\n"
        "  - {message: VM.start, nth: 1, error: [HOST_NOT_LIVE]}\n"
        "  - {message: VM.clone, nth: 2, drop: true}\n"
    )
    cfg = SimConfig.from_file(cfg_file)
    assert cfg.hosts == 2 and cfg.host_memory == 4 * 1024**3
    with SimServer(cfg) as sim:
        x = sim.session().xenapi
        vm = new_vm(x, "c")
        assert failure(x.VM.start, vm, False, False) == ["HOST_NOT_LIVE"]
        h = x.host.get_all()[0]
        assert x.host_metrics.get_memory_total(x.host.get_metrics(h)) == str(4 * 1024**3)
    bad = tmp_path / "bad.yml"
    bad.write_text("hosts: 2\nnonsense: 1\n")
    with pytest.raises(ConfigError, match="nonsense"):
        SimConfig.from_file(bad)
    bad.write_text("faults:\n  - {message: VM.start, error: [NOT_A_CODE]}\n")
    with pytest.raises(ConfigError, match="NOT_A_CODE"):
        SimServer(SimConfig.from_file(bad))
    with pytest.raises(ConfigError):
        SimServer(SimConfig(latency="warp-speed"))
