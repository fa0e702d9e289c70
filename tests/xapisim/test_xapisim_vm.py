"""VM lifecycle over the real SDK: clone/provision/start, placement until memory runs out, events,
tasks, memory/VCPU rules, devices, storage accounting, migration."""

from __future__ import annotations

import threading
import time
import xmlrpc.client
from typing import Any

import pytest
from xsim_helpers import NODE_TEMPLATE, event_from, failure, join_all, new_vm, wait_guest

from xapisim import SimConfig, SimServer

GiB = 1024**3


def wait_task(x: Any, task: str, timeout: float = 20.0) -> dict[str, Any]:
    """Wait for a task with event.from, as a client should (no polling loop of get_status)."""
    token = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec: dict[str, Any] = x.task.get_record(task)
        if rec["status"] != "pending":
            return rec
        result = event_from(x, [f"task/{task}"], token, 5.0)
        token = result["token"]
    raise AssertionError("task did not finish")


def test_thirty_vms_across_hosts_until_memory_runs_out(sim: SimServer) -> None:
    join_all(sim)
    x = sim.session("host-1").xenapi
    hosts = {h: x.host.get_name_label(h) for h in x.host.get_all()}
    started: list[str] = []
    failures: list[list[str]] = []
    for i in range(30):
        vm = new_vm(x, f"node-{i:02d}")
        try:
            x.VM.start(vm, False, False)
        except Exception as e:  # XenAPI.Failure
            failures.append(e.details)  # type: ignore[attr-defined]
        else:
            started.append(vm)
    per_host: dict[str, int] = {}
    for vm in started:
        name = hosts[x.VM.get_resident_on(vm)]
        per_host[name] = per_host.get(name, 0) + 1
    # 8 GiB hosts: 128 MiB host overhead + 1 GiB dom0 leave room for six 1 GiB (+13 MiB) guests each
    assert per_host == {"host-1": 6, "host-2": 6, "host-3": 6}
    assert len(failures) == 12
    code, needed, available = failures[0]
    assert code == "HOST_NOT_ENOUGH_FREE_MEMORY"
    assert int(needed) == GiB + 13 * 1024**2 and int(needed) > int(available) >= 0
    for h in hosts:
        free = int(x.host.compute_free_memory(h))
        assert free == int(available) or free < int(needed)
        metrics = x.host.get_metrics(h)
        assert int(x.host_metrics.get_memory_free(metrics)) == free
    # freeing one host's memory lets the next start land there
    victim = started[0]
    where = x.VM.get_resident_on(victim)
    x.VM.hard_shutdown(victim)
    spare = new_vm(x, "spare")
    x.VM.start(spare, False, False)
    assert x.VM.get_resident_on(spare) == where


def test_start_on_full_host_and_no_hosts_available(sim: SimServer, xapi: Any) -> None:
    x = xapi
    host = x.host.get_all()[0]
    vm = new_vm(x, "big")
    x.VM.set_memory_limits(vm, str(GiB), str(64 * GiB), str(64 * GiB), str(64 * GiB))
    needed, available = failure(x.VM.start_on, vm, host, False, False)[1:]
    assert int(needed) > 64 * GiB and int(available) < 8 * GiB
    # a VM whose disk lives on an SR no host can see cannot be placed anywhere
    vm2 = new_vm(x, "orphan-disk")
    vdi = x.VBD.get_VDI(x.VM.get_VBDs(vm2)[0])
    sr = x.VDI.get_SR(vdi)
    for pbd in x.SR.get_PBDs(sr):
        x.PBD.unplug(pbd)
    assert failure(x.VM.start, vm2, False, False) == ["NO_HOSTS_AVAILABLE"]
    assert failure(x.VM.assert_can_boot_here, vm2, host) == ["VM_REQUIRES_SR", vm2, sr]


def test_power_states_allowed_operations_and_check_order(xapi: Any) -> None:
    x = xapi
    tmpl = x.VM.get_by_name_label(NODE_TEMPLATE)[0]
    assert failure(x.VM.start, tmpl, False, False) == ["VM_IS_TEMPLATE", tmpl, "start"]
    default = x.VM.get_by_name_label("CentOS 7")[0]
    assert failure(x.VM.destroy, default) == ["VM_IS_TEMPLATE", default, "destroy"]
    x.VM.set_is_a_template(default, False)  # still carries other_config:default_template=true
    assert failure(x.VM.destroy, default) == ["VM_CANNOT_DELETE_DEFAULT_TEMPLATE", default]
    vm = new_vm(x, "life")
    assert failure(x.VM.provision, vm) == ["PROVISION_ONLY_ALLOWED_ON_TEMPLATE"]
    ops = x.VM.get_allowed_operations(vm)
    assert "start" in ops and "clean_shutdown" not in ops
    assert failure(x.VM.clean_shutdown, vm) == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    x.VM.start(vm, False, False)
    assert x.VM.get_power_state(vm) == "Running"
    assert x.VM.get_domid(vm) != "-1"
    wait_guest(x, vm)  # HVM: clean operations need the guest agent's feature flags
    ops = x.VM.get_allowed_operations(vm)
    assert "clean_shutdown" in ops and "start" not in ops and "destroy" not in ops
    assert failure(x.VM.start, vm, False, False) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    assert failure(x.VM.destroy, vm) == ["VM_BAD_POWER_STATE", vm, "halted, suspended", "running"]
    x.VM.add_to_blocked_operations(vm, "clean_shutdown", "frozen")
    assert failure(x.VM.clean_shutdown, vm) == ["OPERATION_BLOCKED", vm, "frozen"]
    x.VM.remove_from_blocked_operations(vm, "clean_shutdown")
    x.VM.clean_shutdown(vm)
    assert x.VM.get_power_state(vm) == "Halted" and x.VM.get_resident_on(vm) == "OpaqueRef:NULL"
    assert x.VM.get_domid(vm) == "-1"
    # destroy removes VBDs/VIFs but keeps the VDIs
    vdi = x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])
    x.VM.destroy(vm)
    assert failure(x.VM.get_record, vm) == ["HANDLE_INVALID", "VM", vm]
    assert x.VDI.get_VBDs(vdi) == []


def test_clone_copies_template_fields_and_new_macs(xapi: Any) -> None:
    x = xapi
    tmpl = x.VM.get_by_name_label(NODE_TEMPLATE)[0]
    clone = x.VM.clone(tmpl, "c1")
    rec, trec = x.VM.get_record(clone), x.VM.get_record(tmpl)
    assert rec["is_a_template"] is True and rec["is_default_template"] is False
    assert rec["memory_static_max"] == trec["memory_static_max"] == str(GiB)
    assert rec["other_config"]["mac_seed"] != trec["other_config"]["mac_seed"]
    assert rec["other_config"]["base_template_name"]
    mac = x.VIF.get_MAC(rec["VIFs"][0])
    assert mac != x.VIF.get_MAC(trec["VIFs"][0]) and x.VIF.get_MAC_autogenerated(rec["VIFs"][0])
    new_vdi = x.VBD.get_VDI(rec["VBDs"][0])
    assert new_vdi != x.VBD.get_VDI(trec["VBDs"][0])
    # copy puts full copies on the chosen SR
    local = x.SR.get_by_name_label("Local storage")[0]
    before = int(x.SR.get_physical_utilisation(local))
    copy = x.VM.copy(tmpl, "c2", local)
    vdi = x.VBD.get_VDI(x.VM.get_VBDs(copy)[0])
    assert x.VDI.get_SR(vdi) == local
    assert int(x.SR.get_physical_utilisation(local)) > before


def test_guest_metrics_reset_on_start_and_ip_reported(xapi: Any) -> None:
    x = xapi
    vm = new_vm(x, "ip")
    token = event_from(x, ["vm_guest_metrics"], "", 0.0)["token"]
    x.VM.start(vm, False, False)
    deadline = time.monotonic() + 10
    gm = "OpaqueRef:NULL"
    while gm == "OpaqueRef:NULL" and time.monotonic() < deadline:
        result = event_from(x, ["vm_guest_metrics"], token, 5.0)
        token = result["token"]
        gm = x.VM.get_guest_metrics(vm)
    nets = x.VM_guest_metrics.get_networks(gm)
    assert nets["0/ip"] == nets["0/ipv4/0"] and nets["0/ip"].startswith("10.213.")
    x.VM.hard_shutdown(vm)
    x.VM.start(vm, False, False)
    # cleared at start (the memory backend may already have reported again; then it is a new record)
    assert x.VM.get_guest_metrics(vm) != gm


def test_event_from_wakes_on_power_state_change(xapi: Any, sim: SimServer) -> None:
    x = xapi
    vm = new_vm(x, "watched")
    first = event_from(x, ["vm"], "", 0.0)
    assert first["valid_ref_counts"]["vm"] == len(x.VM.get_all())
    assert isinstance(first["valid_ref_counts"]["vm"], int)  # <i4> on the wire
    assert {e["operation"] for e in first["events"]} == {"add"}
    other = sim.session("host-1").xenapi
    starter = threading.Timer(0.5, other.VM.start, (vm, False, False))
    starter.start()
    try:
        result = event_from(x, [f"vm/{vm}"], first["token"], 30.0)
    finally:
        starter.join(10)
    assert result["events"], "event.from returned on timeout without the change"
    ev = result["events"][-1]
    assert ev["class"] == "vm" and ev["operation"] == "mod" and ev["ref"] == vm
    assert result["events"][-1]["snapshot"]["power_state"] in ("Halted", "Running")
    while x.VM.get_power_state(vm) != "Running":
        result = event_from(x, [f"vm/{vm}"], result["token"], 5.0)
    # a deletion is reported as del without a snapshot; timeout returns no events
    token = event_from(x, ["vm"], "", 0.0)["token"]
    empty = event_from(x, ["vm"], token, 0.2)
    assert empty["events"] == []
    x.VM.hard_shutdown(vm)
    x.VM.destroy(vm)
    dels = [e for e in event_from(x, ["vm"], token, 1.0)["events"] if e["operation"] == "del"]
    assert dels and dels[0]["ref"] == vm and "snapshot" not in dels[0]
    assert failure(getattr(x.event, "from"), ["vm"], "garbage", 0.0) == [
        "EVENT_FROM_TOKEN_PARSE_FAILURE", "garbage"]


def test_tasks_complete_with_results(xapi: Any) -> None:
    x = xapi
    tmpl = x.VM.get_by_name_label(NODE_TEMPLATE)[0]
    task = x.Async.VM.clone(tmpl, "async-clone")
    assert task.startswith("OpaqueRef:")
    rec = wait_task(x, task)
    assert rec["status"] == "success" and rec["progress"] == 1.0
    assert rec["name_label"] == "Async.VM.clone"
    params, _ = xmlrpc.client.loads(f"<params><param>{rec['result']}</param></params>")
    new = params[0]
    assert x.VM.get_name_label(new) == "async-clone"
    x.VM.provision(new)
    done = wait_task(x, x.Async.VM.start(new, False, False))
    assert done["result"] == "<value></value>"
    failed = wait_task(x, x.Async.VM.start(new, False, False))
    assert failed["status"] == "failure"
    assert failed["error_info"] == ["VM_BAD_POWER_STATE", new, "halted", "running"]
    x.task.destroy(task)
    assert failure(x.task.get_record, task) == ["HANDLE_INVALID", "task", task]


def test_other_operation_in_progress() -> None:
    with SimServer(SimConfig(hosts=1, sync_interval=0, latency={"delays": {"VM.start": 1.0}})) as sim:
        x = sim.session().xenapi
        vm = new_vm(x, "slow")
        task = x.Async.VM.start(vm, False, False)
        deadline = time.monotonic() + 5
        while not x.VM.get_current_operations(vm) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert x.VM.get_current_operations(vm) == {task: "start"}
        assert failure(x.VM.start, vm, False, False) == ["OTHER_OPERATION_IN_PROGRESS", "VM", vm, "start", task]
        assert wait_task(x, task)["status"] == "success"


def test_memory_and_vcpu_rules(xapi: Any) -> None:
    x = xapi
    vm = new_vm(x, "mem")
    assert failure(x.VM.set_memory_limits, vm, str(GiB), str(GiB), str(2 * GiB), str(GiB)) == [
        "MEMORY_CONSTRAINT_VIOLATION_ORDER"]
    x.VM.set_memory_limits(vm, str(512 * 1024**2), str(2 * GiB), str(GiB), str(2 * GiB))
    assert x.VM.get_memory_target(vm) == str(GiB)
    x.VM.set_memory(vm, str(GiB))
    assert x.VM.get_memory_dynamic_max(vm) == x.VM.get_memory_static_max(vm) == str(GiB)
    assert failure(x.VM.set_VCPUs_at_startup, vm, "2")[0] == "INVALID_VALUE"
    x.VM.set_VCPUs_max(vm, "2")
    x.VM.set_VCPUs_at_startup(vm, "2")
    assert failure(x.VM.set_VCPUs_max, vm, "1")[0] == "INVALID_VALUE"
    x.VM.start(vm, False, False)
    assert failure(x.VM.set_VCPUs_max, vm, "4") == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    assert failure(x.VM.set_memory_limits, vm, str(GiB), str(GiB), str(GiB), str(GiB)) == [
        "VM_BAD_POWER_STATE", vm, "halted", "running"]
    x.VM.set_memory_dynamic_range(vm, str(GiB), str(GiB))  # allowed while running
    x.VM.set_VCPUs_at_startup(vm, "1")  # no power-state check


def test_devices_and_storage_accounting(xapi: Any) -> None:
    x = xapi
    vm = new_vm(x, "dev")
    net = x.network.get_by_name_label("Pool-wide network associated with eth0")[0]
    vif = {"device": "1", "network": net, "VM": vm, "MAC": "", "MTU": "1500", "other_config": {},
           "qos_algorithm_type": "", "qos_algorithm_params": {}}
    ref = x.VIF.create(vif)
    assert x.VIF.get_MAC_autogenerated(ref) and len(x.VIF.get_MAC(ref)) == 17
    assert failure(x.VIF.create, vif) == ["DEVICE_ALREADY_EXISTS", "1"]
    assert failure(x.VIF.create, dict(vif, device="eth1")) == ["INVALID_DEVICE", "eth1"]
    assert failure(x.VIF.create, dict(vif, device="2", MAC="zz")) == ["MAC_INVALID", "zz"]
    assert failure(x.VIF.create, {"device": "3"})[0] == "FIELD_TYPE_ERROR"
    sr = x.SR.get_by_name_label("Local storage")[0]
    size = int(x.SR.get_physical_size(sr))
    used = int(x.SR.get_physical_utilisation(sr))
    vdi_rec = {"SR": sr, "virtual_size": str(10 * GiB), "type": "user", "sharable": False,
               "read_only": False, "other_config": {}, "name_label": "data"}
    vdi = x.VDI.create(vdi_rec)
    assert int(x.SR.get_physical_utilisation(sr)) == used + 10 * GiB
    too_big = dict(vdi_rec, virtual_size=str(size))
    code, _, reason, _ = failure(x.VDI.create, too_big)
    assert code == "SR_BACKEND_FAILURE_44" and reason == "There is insufficient space"
    vbd = x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "autodetect", "bootable": False,
                        "mode": "RW", "type": "Disk", "empty": False, "other_config": {},
                        "qos_algorithm_type": "", "qos_algorithm_params": {}})
    assert x.VBD.get_userdevice(vbd) == "1"
    assert sorted(x.VM.get_VBDs(vm)) == sorted([x.VM.get_VBDs(vm)[0], vbd]) or vbd in x.VM.get_VBDs(vm)
    x.VM.start(vm, False, False)
    assert failure(x.VDI.destroy, vdi) == ["VDI_IN_USE", vdi, "destroy"]
    assert failure(x.VBD.destroy, vbd) == ["OPERATION_NOT_ALLOWED", "VBD is currently attached"]
    vif = x.VM.get_VIFs(vm)[0]
    assert failure(x.VIF.destroy, vif) == ["OPERATION_NOT_ALLOWED", "VIF is currently attached"]
    x.VM.hard_shutdown(vm)
    x.VBD.destroy(vbd)
    x.VDI.destroy(vdi)
    assert int(x.SR.get_physical_utilisation(sr)) == used


def test_pool_migrate(sim: SimServer) -> None:
    join_all(sim)
    x = sim.session("host-1").xenapi
    hosts = {x.host.get_name_label(h): h for h in x.host.get_all()}
    vm = new_vm(x, "mover")
    assert failure(x.VM.pool_migrate, vm, hosts["host-2"], {"live": "true"}) == [
        "VM_BAD_POWER_STATE", vm, "running", "halted"]
    x.VM.start_on(vm, hosts["host-1"], False, False)
    wait_guest(x, vm)
    x.VM.pool_migrate(vm, hosts["host-2"], {"live": "true"})
    assert x.VM.get_resident_on(vm) == hosts["host-2"]
    # a VM with its disk on host-1's local SR cannot move
    local1 = [s for s in x.SR.get_by_name_label("Local storage")
              if x.PBD.get_host(x.SR.get_PBDs(s)[0]) == hosts["host-1"]][0]
    tmpl = x.VM.get_by_name_label(NODE_TEMPLATE)[0]
    pinned = x.VM.copy(tmpl, "pinned", local1)
    x.VM.provision(pinned)
    x.VM.start(pinned, False, False)
    wait_guest(x, pinned)
    assert x.VM.get_resident_on(pinned) == hosts["host-1"]
    assert failure(x.VM.pool_migrate, pinned, hosts["host-3"], {}) == ["VM_REQUIRES_SR", pinned, local1]


@pytest.mark.parametrize("hosts", [1])
def test_vm_create_deprecated_path(hosts: int) -> None:
    with SimServer(SimConfig(hosts=hosts, sync_interval=0)) as sim:
        x = sim.session().xenapi
        rec = x.VM.get_record(x.VM.get_by_name_label(NODE_TEMPLATE)[0])
        args = {k: rec[k] for k in (
            "name_label", "user_version", "is_a_template", "affinity", "memory_static_max",
            "memory_dynamic_max", "memory_dynamic_min", "memory_static_min", "VCPUs_params",
            "VCPUs_max", "VCPUs_at_startup", "actions_after_shutdown", "actions_after_reboot",
            "actions_after_crash", "PV_bootloader", "PV_kernel", "PV_ramdisk", "PV_args",
            "PV_bootloader_args", "PV_legacy_args", "HVM_boot_policy", "HVM_boot_params",
            "platform", "PCI_bus", "other_config", "recommendations")}
        args.update(name_label="raw", is_a_template=False)
        vm = x.VM.create(args)
        assert x.VM.get_power_state(vm) == "Halted" and "mac_seed" in x.VM.get_other_config(vm)
        del args["memory_static_max"]
        assert failure(x.VM.create, args) == ["FIELD_TYPE_ERROR", "memory_static_max"]


def test_hvm_guest_without_agent_lacks_clean_shutdown() -> None:
    cfg = SimConfig(hosts=1, sync_interval=0, latency={"delays": {"guest_ip": 60.0}})
    with SimServer(cfg) as sim:
        x = sim.session().xenapi
        vm = new_vm(x, "no-agent")
        x.VM.start(vm, False, False)
        assert "clean_shutdown" not in x.VM.get_allowed_operations(vm)
        assert failure(x.VM.clean_shutdown, vm) == ["VM_LACKS_FEATURE", vm]
        x.VM.hard_shutdown(vm)
        assert x.VM.get_power_state(vm) == "Halted"


def test_reboot_pause_suspend_resume(xapi: Any) -> None:
    x = xapi
    vm = new_vm(x, "cycle")
    host = x.host.get_all()[0]
    free_halted = int(x.host.compute_free_memory(host))
    x.VM.start(vm, False, False)
    wait_guest(x, vm)
    domid = x.VM.get_domid(vm)
    x.VM.clean_reboot(vm)
    assert x.VM.get_power_state(vm) == "Running" and x.VM.get_domid(vm) != domid
    wait_guest(x, vm)
    x.VM.pause(vm)
    assert x.VM.get_power_state(vm) == "Paused"
    assert failure(x.VM.suspend, vm) == ["VM_BAD_POWER_STATE", vm, "running", "paused"]
    x.VM.unpause(vm)
    wait_guest(x, vm)
    x.VM.suspend(vm)
    assert x.VM.get_power_state(vm) == "Suspended" and x.VM.get_resident_on(vm) == "OpaqueRef:NULL"
    assert int(x.host.compute_free_memory(host)) == free_halted
    assert failure(x.VM.start, vm, False, False) == ["VM_BAD_POWER_STATE", vm, "halted", "suspended"]
    x.VM.resume_on(vm, host, False, False)
    assert x.VM.get_power_state(vm) == "Running" and x.VM.get_resident_on(vm) == host
    x.VM.hard_reboot(vm)
    assert x.VM.get_power_state(vm) == "Running"
    assert x.VM.get_allowed_VIF_devices(vm)[0] == "1"
    assert x.VM.get_allowed_VBD_devices(vm)[0] == "1"


def test_deprecated_event_register_next(xapi: Any) -> None:
    x = xapi
    assert failure(x.event.next)[0] == "SESSION_NOT_REGISTERED"
    x.event.register(["vm"])
    vm = new_vm(x, "legacy")
    events = x.event.next()
    assert any(e["ref"] == vm and e["class"] == "vm" and e["obj_uuid"] for e in events)
    x.event.unregister(["vm"])


def test_task_cancel() -> None:
    with SimServer(SimConfig(hosts=1, sync_interval=0, latency={"delays": {"VM.clone": 2.0}})) as sim:
        x = sim.session().xenapi
        tmpl = x.VM.get_by_name_label(NODE_TEMPLATE)[0]
        task = x.Async.VM.clone(tmpl, "never")
        assert x.task.get_allowed_operations(task) == ["cancel"]
        x.task.cancel(task)
        rec = wait_task(x, task)
        assert rec["status"] == "cancelled" and rec["error_info"] == ["TASK_CANCELLED", task]
        assert x.VM.get_by_name_label("never") == []
        assert x.VM.get_current_operations(tmpl) == {}
        assert failure(x.task.cancel, task) == ["OPERATION_NOT_ALLOWED", "Task is not cancellable"]


def test_concurrent_starts_reserve_memory() -> None:
    """Async starts in flight see each other's reservation (scheduled_to_be_resident_on)."""
    cfg = SimConfig(hosts=3, sync_interval=0, latency={"delays": {"VM.start": 0.3}}, seed=3)
    with SimServer(cfg) as sim:
        join_all(sim)
        x = sim.session("host-1").xenapi
        vms = [new_vm(x, f"par-{i:02d}") for i in range(24)]
        tasks = [x.Async.VM.start(vm, False, False) for vm in vms]
        results = [wait_task(x, t) for t in tasks]
        ok = [r for r in results if r["status"] == "success"]
        bad = [r for r in results if r["status"] == "failure"]
        assert len(ok) == 18 and len(bad) == 6
        assert {r["error_info"][0] for r in bad} == {"HOST_NOT_ENOUGH_FREE_MEMORY"}
        for h in x.host.get_all():
            running = [v for v in x.host.get_resident_VMs(h) if not x.VM.get_is_control_domain(v)]
            assert len(running) == 6
            vbds = [b for v in running for b in x.VM.get_VBDs(v)]
            assert all(x.VBD.get_currently_attached(b) for b in vbds)


def test_devices_plug_cd_vdi_ops_snapshot(xapi: Any) -> None:
    x = xapi
    vm = new_vm(x, "more")
    vbd = x.VM.get_VBDs(vm)[0]
    vif = x.VM.get_VIFs(vm)[0]
    assert failure(x.VBD.plug, vbd) == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    x.VM.start(vm, False, False)
    assert failure(x.VIF.plug, vif) == ["DEVICE_ALREADY_ATTACHED", vif]
    x.VIF.unplug(vif)
    assert failure(x.VIF.unplug, vif) == ["DEVICE_ALREADY_DETACHED", vif]
    x.VIF.plug(vif)
    assert failure(x.VBD.eject, vbd) == ["VBD_NOT_REMOVABLE_MEDIA", vbd]
    cd = x.VBD.create({"VM": vm, "VDI": "OpaqueRef:NULL", "userdevice": "3", "bootable": False,
                       "mode": "RO", "type": "CD", "empty": True, "other_config": {},
                       "qos_algorithm_type": "", "qos_algorithm_params": {}})
    assert failure(x.VBD.eject, cd) == ["VBD_IS_EMPTY", cd]
    disk = x.VBD.get_VDI(vbd)
    x.VBD.insert(cd, disk)
    assert failure(x.VBD.insert, cd, disk) == ["VBD_NOT_EMPTY", cd]
    x.VBD.eject(cd)
    sr = x.VDI.get_SR(disk)
    clone = x.VDI.clone(disk, {})
    assert x.VDI.get_SR(clone) == sr and x.VDI.get_virtual_size(clone) == x.VDI.get_virtual_size(disk)
    local = x.SR.get_by_name_label("Local storage")[0]
    used = int(x.SR.get_physical_utilisation(local))
    copy = x.VDI.copy(disk, local, "OpaqueRef:NULL", "OpaqueRef:NULL")
    assert x.VDI.get_SR(copy) == local and int(x.SR.get_physical_utilisation(local)) > used
    size = int(x.VDI.get_virtual_size(copy))
    x.VDI.resize(copy, str(size * 2))
    assert x.VDI.get_virtual_size(copy) == str(size * 2)
    assert failure(x.VDI.resize, copy, str(size))[0] == "SR_BACKEND_FAILURE_79"
    snap = x.VM.snapshot(vm, "snap", [])
    rec = x.VM.get_record(snap)
    assert rec["is_a_snapshot"] and rec["snapshot_of"] == vm and rec["is_a_template"]
    assert snap in x.VM.get_snapshots(vm)
    assert failure(x.VM.start, snap, False, False) == ["VM_IS_SNAPSHOT", snap, "start"]


def test_sr_create_and_host_power(sim: SimServer) -> None:
    join_all(sim)
    x = sim.session("host-1").xenapi
    hosts = {x.host.get_name_label(h): h for h in x.host.get_all()}
    sr = x.SR.create(hosts["host-2"], {"server": "10.213.0.9", "serverpath": "/sr2"}, "0", "NFS 2", "",
                     "nfs", "user", True, {})
    assert len(x.SR.get_PBDs(sr)) == 3
    assert failure(x.SR.create, hosts["host-1"], {}, "0", "x", "", "zfs", "user", False, {}) == [
        "SR_UNKNOWN_DRIVER", "zfs"]
    assert failure(x.SR.forget, sr) == ["SR_HAS_PBD", sr]
    for pbd in x.SR.get_PBDs(sr):
        x.PBD.unplug(pbd)
    x.SR.forget(sr)
    # evacuate then reboot host-3
    vm = new_vm(x, "evac")
    x.VM.start_on(vm, hosts["host-3"], False, False)
    assert failure(x.host.reboot, hosts["host-3"]) == ["HOST_NOT_DISABLED"]
    x.host.disable(hosts["host-3"])
    assert failure(x.host.reboot, hosts["host-3"]) == ["HOST_HAS_RESIDENT_VMS", hosts["host-3"]]
    assert x.host.get_vms_which_prevent_evacuation(hosts["host-3"]) == {}
    x.host.evacuate(hosts["host-3"])
    assert x.VM.get_resident_on(vm) in (hosts["host-1"], hosts["host-2"])
    x.host.reboot(hosts["host-3"])
    metrics = x.host.get_metrics(hosts["host-3"])
    token = event_from(x, [f"host_metrics/{metrics}"], "", 0.0)["token"]
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and seen[-2:] != [False, True]:
        result = event_from(x, [f"host_metrics/{metrics}"], token, 2.0)
        token = result["token"]
        seen += [e["snapshot"]["live"] for e in result["events"]]
    assert seen[-2:] == [False, True]
    assert x.host.get_enabled(hosts["host-3"]) is True
    assert failure(x.host.power_on, hosts["host-3"]) == ["HOST_POWER_ON_MODE_DISABLED"]
