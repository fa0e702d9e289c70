"""VM lifecycle handlers (xapi_vm.ml, xapi_vm_lifecycle.ml, xapi_vm_clone.ml, xapi_vm_helpers.ml,
message_forwarding.ml): operation checks in xapi's order, allowed_operations, clone/copy/provision,
start/start_on with placement and memory accounting, shutdowns, destroy, memory and VCPU rules,
pool_migrate, and the guest backend calls.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import errors
from .api_core import compute_free_memory, refresh_host_memory
from .db import NULL, Database, new_uuid
from .dispatch import implements
from .fixtures import mac_for, vm_memory_overhead
from .models import Ctx, XapiModel
from .wire import now

STATES = ("Halted", "Paused", "Running", "Suspended")


def _allowed_states() -> dict[str, list[str]]:
    from .datamodel import load
    table = load().tables["vm_operation_allowed_power_states"]
    out: dict[str, list[str]] = {}
    for op, states in table.items():
        flat: list[str] = []
        for s in states:
            first = s.split(" ")[0]
            if first in STATES:
                flat.append(first)
        out[op] = flat
    return out


ALLOWED = _allowed_states()
TEMPLATE_OPS = {"changing_dynamic_range", "changing_static_range", "changing_memory_limits",
                "changing_shadow_memory", "changing_VCPUs", "changing_NVRAM", "clone", "copy",
                "export", "metadata_export", "provision"}
NON_DEFAULT_TEMPLATE_OPS = {"destroy", "migrate_send"}
CONCURRENT = [{"clone", "copy", "export", "metadata_export"}, {"snapshot", "checkpoint"}]
# HVM guests need the guest agent's feature flags for cooperative operations (check_op_for_feature)
NEEDS_FEATURE = {"clean_shutdown": "feature-shutdown", "clean_reboot": "feature-reboot",
                 "suspend": "feature-suspend", "checkpoint": "feature-suspend",
                 "pool_migrate": "feature-suspend"}
# operations we advertise in allowed_operations (the ones this simulator implements)
ADVERTISED = ["start", "start_on", "clean_shutdown", "hard_shutdown", "shutdown", "destroy",
              "clean_reboot", "hard_reboot", "pause", "unpause", "suspend", "resume", "resume_on",
              "clone", "copy", "provision", "pool_migrate", "changing_memory_limits",
              "changing_static_range", "changing_dynamic_range", "changing_VCPUs",
              "make_into_template"]


def check_operation(db: Database, vm: str, op: str) -> errors.XenAPIError | None:
    """The first failure of xapi_vm_lifecycle.check_operation_error, or None."""
    rec = db.get("VM", vm)
    if op in rec["blocked_operations"]:
        return errors.failure("OPERATION_BLOCKED", vm, rec["blocked_operations"][op])
    allowed = ALLOWED.get(op, list(STATES))
    if rec["is_control_domain"] and op.startswith("changing_"):
        allowed = allowed + ["Running"]
    if rec["power_state"] not in allowed:
        return errors.failure("VM_BAD_POWER_STATE", vm, ", ".join(s.lower() for s in allowed),
                              rec["power_state"].lower())
    current = rec["current_operations"]
    if current:
        task, other = next(iter(current.items()))
        together = any(op in g and other in g for g in CONCURRENT) or op == "hard_shutdown"
        if not together:
            return errors.failure("OTHER_OPERATION_IN_PROGRESS", "VM", vm, other, task)
    if rec["is_a_template"] and not rec["is_a_snapshot"]:
        default = rec["is_default_template"] or rec["other_config"].get("default_template") == "true"
        ok = op in TEMPLATE_OPS or (op in NON_DEFAULT_TEMPLATE_OPS and not default)
        if not ok:
            return errors.failure("VM_IS_TEMPLATE", vm, op)
    if rec["is_a_snapshot"] and op not in ("clone", "copy", "export", "destroy", "revert"):
        return errors.failure("VM_IS_SNAPSHOT", vm, op)
    if op == "provision" and not rec["is_a_template"]:
        return errors.failure("PROVISION_ONLY_ALLOWED_ON_TEMPLATE")
    feature = NEEDS_FEATURE.get(op)
    if feature and rec["domain_type"] == "hvm" and not rec["is_control_domain"]:
        gm = rec["guest_metrics"]
        other = db.get("VM_guest_metrics", gm)["other"] if gm != NULL and db.exists("VM_guest_metrics", gm) else {}
        if other.get(feature) != "1":
            return errors.failure("VM_LACKS_FEATURE", vm)
    if rec["is_control_domain"] and op in ("start", "start_on", "clean_shutdown", "hard_shutdown",
                                            "shutdown", "destroy", "clone", "copy", "pool_migrate",
                                            "provision", "make_into_template"):
        return errors.failure("OPERATION_NOT_ALLOWED", f"This operation is not allowed on the control domain: {op}")
    return None


def update_allowed(db: Database, vm: str) -> None:
    if not db.exists("VM", vm):
        return
    ops = [op for op in ADVERTISED if check_operation(db, vm, op) is None]
    if db.get("VM", vm)["allowed_operations"] != ops:
        db.set("VM", vm, "allowed_operations", ops)


def assert_op(db: Database, vm: str, op: str) -> None:
    err = check_operation(db, vm, op)
    if err is not None:
        raise err


@contextmanager
def vm_operation(m: XapiModel, ctx: Ctx, vm: str, op: str) -> Iterator[None]:
    """message_forwarding.with_vm_operation: check, mark current_operations, always unmark."""
    db = ctx.db
    assert_op(db, vm, op)
    cur = dict(db.get("VM", vm)["current_operations"])
    cur[ctx.op_ref] = op
    db.set("VM", vm, "current_operations", cur)
    update_allowed(db, vm)
    m.notify()
    try:
        yield
    finally:
        if db.exists("VM", vm):
            cur = dict(db.get("VM", vm)["current_operations"])
            cur.pop(ctx.op_ref, None)
            db.set("VM", vm, "current_operations", cur)
            update_allowed(db, vm)
        m.notify()


def set_devices_attached(db: Database, vm: str, attached: bool) -> None:
    """Plug (start) or unplug (halt) the VM's VBDs and VIFs, as xenopsd reports them."""
    for vbd in db.reverse("VM", "VBDs", vm):
        rec = db.get("VBD", vbd)
        if rec["currently_attached"] != attached:
            device = (f"xvd{chr(ord('a') + int(rec['userdevice']))}"
                      if attached and rec["userdevice"].isdigit() and int(rec["userdevice"]) < 26 else rec["device"])
            db.update("VBD", vbd, currently_attached=attached, device=device)
    for vif in db.reverse("VM", "VIFs", vm):
        if db.get("VIF", vif)["currently_attached"] != attached:
            db.set("VIF", vif, "currently_attached", attached)


def set_progress(m: XapiModel, ctx: Ctx, value: float) -> None:
    if ctx.task != NULL and ctx.db.exists("task", ctx.task):
        ctx.db.set("task", ctx.task, "progress", value)
        m.notify()


# -- storage accounting -------------------------------------------------------------------------

def sr_allocate(db: Database, sr: str, physical: int, virtual: int) -> None:
    rec = db.get("SR", sr)
    if rec["content_type"] == "iso" or rec["type"] in ("iso", "udev"):
        raise errors.failure("OPERATION_NOT_ALLOWED", f"SR {rec['uuid']} cannot hold VM disks")
    free = rec["physical_size"] - rec["physical_utilisation"]
    if physical > free:
        raise errors.failure("SR_BACKEND_FAILURE_44", "", "There is insufficient space",
                             f"needed {physical} bytes, {free} free on SR {rec['uuid']}")
    db.update("SR", sr, physical_utilisation=rec["physical_utilisation"] + physical,
              virtual_allocation=rec["virtual_allocation"] + virtual)


def sr_release(db: Database, sr: str, physical: int, virtual: int) -> None:
    if not db.exists("SR", sr):
        return
    rec = db.get("SR", sr)
    db.update("SR", sr, physical_utilisation=max(0, rec["physical_utilisation"] - physical),
              virtual_allocation=max(0, rec["virtual_allocation"] - virtual))


def new_vdi(db: Database, sr: str, *, name: str, size: int, vtype: str = "system",
            physical: int | None = None, **extra: Any) -> str:
    phys = size if physical is None else physical
    sr_allocate(db, sr, phys, size)
    values: dict[str, Any] = {
        "sharable": False, "read_only": False, "managed": True, "location": new_uuid(),
        "allowed_operations": ["clone", "copy", "destroy", "resize", "snapshot"]}
    values.update(extra)
    values.update(name_label=name, SR=sr, virtual_size=size, physical_utilisation=phys, type=vtype)
    return db.create("VDI", **values)


# -- clone / copy / provision ---------------------------------------------------------------------

def _copy_vm(m: XapiModel, ctx: Ctx, vm: str, new_name: str, sr: str | None) -> str:
    db = ctx.db
    src = db.get("VM", vm)
    rec = {k: v for k, v in src.items() if k not in ("uuid",)}
    seed = new_uuid()
    other = dict(src["other_config"])
    other["mac_seed"] = seed
    other.pop("default_template", None)
    if src["is_a_template"]:
        other["base_template_name"] = src["other_config"].get("base_template_name", src["name_label"]) \
            if not src["is_default_template"] else src["name_label"]
    metrics = db.create("VM_metrics", memory_actual=0, VCPUs_number=src["VCPUs_at_startup"],
                        last_updated=now(), install_time=now())
    rec.update(
        name_label=new_name, is_default_template=False, resident_on=NULL,
        scheduled_to_be_resident_on=NULL, other_config=other, current_operations={},
        allowed_operations=[], metrics=metrics, guest_metrics=NULL, domid=-1,
        power_state="Halted" if src["power_state"] != "Suspended" else "Suspended",
        parent=NULL, snapshot_of=NULL, is_a_snapshot=False,
    )
    new = db.create("VM", **rec)
    for vbd in db.reverse("VM", "VBDs", vm):
        vrec = dict(db.get("VBD", vbd))
        vdi = vrec["VDI"]
        if vdi != NULL and db.exists("VDI", vdi):
            d = db.get("VDI", vdi)
            if sr is None:  # clone: a thin copy-on-write child on the same SR
                vdi = new_vdi(db, d["SR"], name=d["name_label"], size=d["virtual_size"],
                              vtype=d["type"], physical=0, other_config=dict(d["other_config"]),
                              sm_config={"vhd-parent": d["uuid"]})
            else:  # copy: a full copy on the target SR
                vdi = new_vdi(db, sr, name=d["name_label"], size=d["virtual_size"], vtype=d["type"],
                              physical=d["physical_utilisation"] or d["virtual_size"],
                              other_config=dict(d["other_config"]))
        vrec.pop("uuid")
        vrec.update(VM=new, VDI=vdi, currently_attached=False, current_operations={})
        db.create("VBD", **vrec)
    for vif in db.reverse("VM", "VIFs", vm):
        frec = dict(db.get("VIF", vif))
        frec.pop("uuid")
        frec.update(VM=new, MAC=mac_for(seed, frec["device"]), MAC_autogenerated=True,
                    currently_attached=False, current_operations={})
        db.create("VIF", **frec)
    update_allowed(db, new)
    return new


@implements("VM.clone")
def vm_clone(m: XapiModel, ctx: Ctx, vm: str, new_name: str) -> str:
    with vm_operation(m, ctx, vm, "clone"):
        m.delay("VM.clone")
        set_progress(m, ctx, 0.5)
        new = _copy_vm(m, ctx, vm, new_name, None)
    m.notify()
    return new


@implements("VM.copy")
def vm_copy(m: XapiModel, ctx: Ctx, vm: str, new_name: str, sr: str) -> str:
    db = ctx.db
    if sr != NULL:
        srec = db.get("SR", sr)
        if srec["content_type"] == "iso":
            raise errors.failure("OPERATION_NOT_ALLOWED", "Cannot copy a VM's disks to an ISO SR")
    with vm_operation(m, ctx, vm, "copy"):
        m.delay("VM.copy")
        target = sr
        if sr == NULL:
            target = ""
        new = _copy_vm(m, ctx, vm, new_name, target or None) if target else _full_copy_same_sr(m, ctx, vm, new_name)
    m.notify()
    return new


def _full_copy_same_sr(m: XapiModel, ctx: Ctx, vm: str, new_name: str) -> str:
    db = ctx.db
    srs = {db.get("VDI", db.get("VBD", b)["VDI"])["SR"] for b in db.reverse("VM", "VBDs", vm)
           if db.get("VBD", b)["VDI"] != NULL and db.exists("VDI", db.get("VBD", b)["VDI"])}
    sr = next(iter(srs)) if srs else db.get("pool", db.one("pool"))["default_SR"]
    return _copy_vm(m, ctx, vm, new_name, sr)


_DISK = re.compile(r"<provision>.*</provision>", re.S)


@implements("VM.provision")
def vm_provision(m: XapiModel, ctx: Ctx, vm: str) -> str:
    db = ctx.db
    with vm_operation(m, ctx, vm, "provision"):
        m.delay("VM.provision")
        db.set("VM", vm, "is_a_template", False)
        metrics = db.get("VM", vm)["metrics"]
        if db.exists("VM_metrics", metrics):
            db.set("VM_metrics", metrics, "install_time", now())
        spec = db.get("VM", vm)["other_config"].get("disks", "")
        created: list[tuple[str, str]] = []
        if spec:
            try:
                root = ET.fromstring(spec)
            except ET.ParseError:
                raise errors.failure("INVALID_VALUE", "other_config:disks", spec) from None
            try:
                for disk in root.findall("disk"):
                    sr_uuid = disk.get("sr", "")
                    sr = db.by_uuid("SR", sr_uuid) if sr_uuid else None
                    if sr is None:
                        raise errors.failure("UUID_INVALID", "sr", sr_uuid)
                    size = int(disk.get("size", "0"))
                    vtype = disk.get("type", "system")
                    device = disk.get("device", "0")
                    vdi = new_vdi(db, sr, name=device, size=size, vtype=vtype,
                                  name_description="Created by template provisioner",
                                  sm_config={"vmhint": db.get("VM", vm)["uuid"]})
                    vbd = db.create("VBD", VM=vm, VDI=vdi, userdevice=device,
                                    bootable=disk.get("bootable", "false") == "true", mode="RW",
                                    type="Disk", empty=False, unpluggable=vtype != "system",
                                    other_config={"owner": ""})
                    created.append((vbd, vdi))
            except errors.XenAPIError:
                for vbd, vdi in created:
                    d = db.get("VDI", vdi)
                    sr_release(db, d["SR"], d["physical_utilisation"], d["virtual_size"])
                    db.destroy("VBD", vbd)
                    db.destroy("VDI", vdi)
                raise
            other = dict(db.get("VM", vm)["other_config"])
            other.pop("disks", None)
            other.pop("postinstall", None)
            db.set("VM", vm, "other_config", other)
    m.notify()
    return ""


# -- placement ------------------------------------------------------------------------------------

def footprint(rec: dict[str, Any]) -> int:
    return int(rec["memory_dynamic_min"] + rec["memory_overhead"])


def assert_can_boot_here(m: XapiModel, db: Database, vm: str, host: str, *, memory: bool = True) -> None:
    """xapi_vm_helpers.assert_can_boot_here, in its order (the checks the simulator models)."""
    rec = db.get("VM", vm)
    hrec = db.get("host", host)
    validate_basic(db, vm)
    metrics = hrec["metrics"]
    if not db.exists("host_metrics", metrics) or not db.get("host_metrics", metrics)["live"]:
        raise errors.failure("HOST_NOT_LIVE")
    if not hrec["enabled"]:
        raise errors.failure("HOST_DISABLED", host)
    for vbd in db.reverse("VM", "VBDs", vm):
        vrec = db.get("VBD", vbd)
        if vrec["empty"] or vrec["VDI"] == NULL or not db.exists("VDI", vrec["VDI"]):
            continue
        sr = db.get("VDI", vrec["VDI"])["SR"]
        if not any(db.get("PBD", p)["host"] == host and db.get("PBD", p)["currently_attached"]
                   for p in db.reverse("SR", "PBDs", sr)):
            raise errors.failure("VM_REQUIRES_SR", vm, sr)
    for vif in db.reverse("VM", "VIFs", vm):
        net = db.get("VIF", vif)["network"]
        if not db.exists("network", net):
            continue
        pifs = db.reverse("network", "PIFs", net)
        if pifs and not any(db.get("PIF", p)["host"] == host for p in pifs):
            raise errors.failure("VM_REQUIRES_NETWORK", vm, net)
    if memory:
        available = compute_free_memory(m, db, host, exclude_vm=vm)
        needed = footprint(rec)
        if needed > available:
            raise errors.failure("HOST_NOT_ENOUGH_FREE_MEMORY", needed, available)
    pcpus = len(db.reverse("host", "host_CPUs", host))
    if pcpus and rec["VCPUs_max"] > pcpus and rec["platform"].get("vcpu-unrestricted") != "true":
        raise errors.failure("HOST_NOT_ENOUGH_PCPUS", rec["VCPUs_max"], pcpus)


def validate_basic(db: Database, vm: str) -> None:
    rec = db.get("VM", vm)
    if rec["VCPUs_max"] < 1:
        raise errors.failure("INVALID_VALUE", "VCPUs_max", rec["VCPUs_max"])
    if rec["VCPUs_at_startup"] > rec["VCPUs_max"]:
        raise errors.failure("VALUE_NOT_SUPPORTED", "VCPUs-at-startup", rec["VCPUs_at_startup"],
                             "value greater than VCPUs-max")
    if not (rec["memory_static_min"] <= rec["memory_dynamic_min"] <= rec["memory_dynamic_max"]
            <= rec["memory_static_max"]):
        raise errors.failure("MEMORY_CONSTRAINT_VIOLATION",
                             "Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max <= static_max")


def choose_host(m: XapiModel, db: Database, vm: str) -> str:
    """xapi_vm_placement: definite/probable/possible categories, biased random within each."""
    rec = db.get("VM", vm)
    hosts = list(db.tables["host"])
    if rec["affinity"] in hosts:
        try:
            assert_can_boot_here(m, db, vm, rec["affinity"])
            return str(rec["affinity"])
        except errors.XenAPIError:
            pass
    candidates: list[tuple[int, str]] = []
    for host in hosts:
        try:
            assert_can_boot_here(m, db, vm, host)
        except errors.XenAPIError:
            continue
        slack = compute_free_memory(m, db, host, exclude_vm=vm) - int(rec["memory_static_max"])
        candidates.append((slack, host))
    if candidates:
        candidates.sort(key=lambda c: c[0], reverse=True)
        index = int(len(candidates) * m.rng.random() ** 2)
        return candidates[min(index, len(candidates) - 1)][1]
    # nothing fits with the memory check: retry without it, then let the memory check speak
    for host in sorted(hosts, key=lambda h: compute_free_memory(m, db, h, exclude_vm=vm), reverse=True):
        try:
            assert_can_boot_here(m, db, vm, host, memory=False)
        except errors.XenAPIError:
            continue
        assert_can_boot_here(m, db, vm, host)
        return host
    raise errors.failure("NO_HOSTS_AVAILABLE")


# -- start / shutdown / destroy -------------------------------------------------------------------

def _start(m: XapiModel, ctx: Ctx, vm: str, host: str | None, paused: bool, op: str) -> str:
    db = ctx.db
    with vm_operation(m, ctx, vm, op):
        rec = db.get("VM", vm)
        db.set("VM", vm, "memory_overhead", vm_memory_overhead(rec["memory_static_max"], rec["VCPUs_max"]))
        if host is None:
            scheduled = rec["scheduled_to_be_resident_on"]
            host = scheduled if scheduled != NULL and db.exists("host", scheduled) else choose_host(m, db, vm)
        else:
            assert_can_boot_here(m, db, vm, host)
        db.set("VM", vm, "scheduled_to_be_resident_on", host)
        refresh_host_memory(m, db, host)
        set_progress(m, ctx, 0.1)
        m.notify()
        try:
            m.delay(f"VM.{op}")
            set_progress(m, ctx, 0.9)
            if not db.exists("VM", vm):
                raise errors.failure("HANDLE_INVALID", "VM", vm)
            gm = db.get("VM", vm)["guest_metrics"]
            if gm != NULL and db.exists("VM_guest_metrics", gm):
                db.destroy("VM_guest_metrics", gm)
            rec = db.get("VM", vm)
            db.update("VM", vm, power_state="Paused" if paused else "Running", resident_on=host,
                      scheduled_to_be_resident_on=NULL, domid=m.next_domid(), guest_metrics=NULL)
            if db.exists("VM_metrics", rec["metrics"]):
                db.update("VM_metrics", rec["metrics"], start_time=now(), last_updated=now(),
                          memory_actual=rec["memory_dynamic_max"], VCPUs_number=rec["VCPUs_at_startup"],
                          state=[])
            db.update("VM", vm, last_boot_CPU_flags={"vendor": "GenuineIntel"})
            set_devices_attached(db, vm, True)
            spec = m.guest_spec(db, vm, host)
            reporter = m.make_ip_reporter(spec.vm_uuid)
            m.notify()
            try:
                with m.unlocked():
                    m.backend.start(spec, reporter)
            except Exception as e:
                if db.exists("VM", vm):
                    db.update("VM", vm, power_state="Halted", resident_on=NULL, domid=-1)
                    set_devices_attached(db, vm, False)
                if isinstance(e, errors.XenAPIError):
                    raise
                raise errors.failure("INTERNAL_ERROR", f"guest backend {m.backend.name}: {e}") from e
        finally:
            if db.exists("VM", vm) and db.get("VM", vm)["scheduled_to_be_resident_on"] != NULL:
                db.set("VM", vm, "scheduled_to_be_resident_on", NULL)
            refresh_host_memory(m, db, host)
    m.notify()
    return ""


@implements("VM.start")
def vm_start(m: XapiModel, ctx: Ctx, vm: str, start_paused: bool, force: bool) -> str:
    return _start(m, ctx, vm, None, start_paused, "start")


@implements("VM.start_on")
def vm_start_on(m: XapiModel, ctx: Ctx, vm: str, host: str, start_paused: bool, force: bool) -> str:
    ctx.db.get("host", host)
    return _start(m, ctx, vm, host, start_paused, "start_on")


def _halt(m: XapiModel, ctx: Ctx, vm: str, op: str, hard: bool) -> str:
    db = ctx.db
    with vm_operation(m, ctx, vm, op):
        m.delay(f"VM.{op}")
        uuid = db.get("VM", vm)["uuid"]
        with m.unlocked():
            try:
                m.backend.shutdown(uuid, hard)
            except Exception as e:
                raise errors.failure("INTERNAL_ERROR", f"guest backend {m.backend.name}: {e}") from e
        rec = db.get("VM", vm)
        host = rec["resident_on"]
        db.update("VM", vm, power_state="Halted", resident_on=NULL, domid=-1)
        set_devices_attached(db, vm, False)
        if db.exists("VM_metrics", rec["metrics"]):
            db.update("VM_metrics", rec["metrics"], memory_actual=0, last_updated=now())
        if host != NULL and db.exists("host", host):
            refresh_host_memory(m, db, host)
    m.notify()
    return ""


@implements("VM.clean_shutdown")
def vm_clean_shutdown(m: XapiModel, ctx: Ctx, vm: str) -> str:
    return _halt(m, ctx, vm, "clean_shutdown", False)


@implements("VM.hard_shutdown")
def vm_hard_shutdown(m: XapiModel, ctx: Ctx, vm: str) -> str:
    return _halt(m, ctx, vm, "hard_shutdown", True)


@implements("VM.shutdown")
def vm_shutdown(m: XapiModel, ctx: Ctx, vm: str) -> str:
    return _halt(m, ctx, vm, "shutdown", False)


def _reboot(m: XapiModel, ctx: Ctx, vm: str, op: str) -> str:
    db = ctx.db
    with vm_operation(m, ctx, vm, op):
        m.delay(f"VM.{op}")
        rec = db.get("VM", vm)
        host = rec["resident_on"]
        gm = rec["guest_metrics"]
        if gm != NULL and db.exists("VM_guest_metrics", gm):
            db.destroy("VM_guest_metrics", gm)
        db.update("VM", vm, guest_metrics=NULL, domid=m.next_domid(), power_state="Running")
        spec = m.guest_spec(db, vm, host)
        reporter = m.make_ip_reporter(spec.vm_uuid)
        m.notify()
        try:
            with m.unlocked():
                m.backend.shutdown(spec.vm_uuid, op == "hard_reboot")
                m.backend.start(spec, reporter)
        except Exception as e:
            raise errors.failure("INTERNAL_ERROR", f"guest backend {m.backend.name}: {e}") from e
    m.notify()
    return ""


@implements("VM.clean_reboot")
def vm_clean_reboot(m: XapiModel, ctx: Ctx, vm: str) -> str:
    return _reboot(m, ctx, vm, "clean_reboot")


@implements("VM.hard_reboot")
def vm_hard_reboot(m: XapiModel, ctx: Ctx, vm: str) -> str:
    return _reboot(m, ctx, vm, "hard_reboot")


def _set_state(m: XapiModel, ctx: Ctx, vm: str, op: str, state: str) -> str:
    with vm_operation(m, ctx, vm, op):
        m.delay(f"VM.{op}")
        ctx.db.set("VM", vm, "power_state", state)
    m.notify()
    return ""


@implements("VM.pause")
def vm_pause(m: XapiModel, ctx: Ctx, vm: str) -> str:
    return _set_state(m, ctx, vm, "pause", "Paused")


@implements("VM.unpause")
def vm_unpause(m: XapiModel, ctx: Ctx, vm: str) -> str:
    return _set_state(m, ctx, vm, "unpause", "Running")


@implements("VM.suspend")
def vm_suspend(m: XapiModel, ctx: Ctx, vm: str) -> str:
    """Suspend: the memory image goes to the suspend SR; the host's memory is released."""
    db = ctx.db
    with vm_operation(m, ctx, vm, "suspend"):
        m.delay("VM.suspend")
        rec = db.get("VM", vm)
        with m.unlocked():
            try:
                m.backend.shutdown(rec["uuid"], False)
            except Exception as e:
                raise errors.failure("INTERNAL_ERROR", f"guest backend {m.backend.name}: {e}") from e
        host = rec["resident_on"]
        db.update("VM", vm, power_state="Suspended", resident_on=NULL, domid=-1)
        set_devices_attached(db, vm, False)
        if host != NULL and db.exists("host", host):
            refresh_host_memory(m, db, host)
    m.notify()
    return ""


@implements("VM.resume")
def vm_resume(m: XapiModel, ctx: Ctx, vm: str, start_paused: bool, force: bool) -> str:
    return _start(m, ctx, vm, None, start_paused, "resume")


@implements("VM.resume_on")
def vm_resume_on(m: XapiModel, ctx: Ctx, vm: str, host: str, start_paused: bool, force: bool) -> str:
    ctx.db.get("host", host)
    return _start(m, ctx, vm, host, start_paused, "resume_on")


@implements("VM.get_allowed_VBD_devices")
def vm_get_allowed_VBD_devices(m: XapiModel, ctx: Ctx, vm: str) -> list[str]:
    used = {ctx.db.get("VBD", b)["userdevice"] for b in ctx.db.reverse("VM", "VBDs", vm)}
    return [str(i) for i in range(16) if str(i) not in used]


@implements("VM.get_allowed_VIF_devices")
def vm_get_allowed_VIF_devices(m: XapiModel, ctx: Ctx, vm: str) -> list[str]:
    used = {ctx.db.get("VIF", v)["device"] for v in ctx.db.reverse("VM", "VIFs", vm)}
    return [str(i) for i in range(7) if str(i) not in used]


@implements("VM.power_state_reset")
def vm_power_state_reset(m: XapiModel, ctx: Ctx, vm: str) -> str:
    db = ctx.db
    rec = db.get("VM", vm)
    host = rec["resident_on"]
    if rec["power_state"] == "Running" and host != NULL and db.exists("host", host):
        metrics = db.get("host", host)["metrics"]
        if db.get("host_metrics", metrics)["live"]:
            raise errors.failure("HOST_IS_LIVE", host)
    db.update("VM", vm, power_state="Halted", resident_on=NULL, domid=-1, current_operations={})
    set_devices_attached(db, vm, False)
    update_allowed(db, vm)
    m.notify()
    return ""


@implements("VM.destroy")
def vm_destroy(m: XapiModel, ctx: Ctx, self: str) -> str:
    db = ctx.db
    assert_op(db, self, "destroy")  # a default template fails here: VM_IS_TEMPLATE [self, "destroy"]
    if db.get("VM", self)["other_config"].get("default_template") == "true":
        # xapi_vm_helpers.destroy: reached when a default template was turned into a plain VM
        raise errors.failure("VM_CANNOT_DELETE_DEFAULT_TEMPLATE", self)
    m.delay("VM.destroy")
    if not db.exists("VM", self):
        return ""
    rec = db.get("VM", self)
    for vbd in db.reverse("VM", "VBDs", self):
        db.destroy("VBD", vbd)
    for vif in db.reverse("VM", "VIFs", self):
        db.destroy("VIF", vif)
    for cls, field in (("VM_metrics", "metrics"), ("VM_guest_metrics", "guest_metrics")):
        if rec[field] != NULL and db.exists(cls, rec[field]):
            db.destroy(cls, rec[field])
    db.destroy("VM", self)
    with m.unlocked():
        try:
            m.backend.destroy(rec["uuid"])
        except Exception as e:
            raise errors.failure("INTERNAL_ERROR", f"guest backend {m.backend.name}: {e}") from e
    m.notify()
    return ""


@implements("VM.pool_migrate")
def vm_pool_migrate(m: XapiModel, ctx: Ctx, vm: str, host: str, options: dict[str, str]) -> str:
    db = ctx.db
    db.get("host", host)
    with vm_operation(m, ctx, vm, "pool_migrate"):
        source = db.get("VM", vm)["resident_on"]
        assert_can_boot_here(m, db, vm, host)
        db.set("VM", vm, "scheduled_to_be_resident_on", host)
        m.delay("VM.pool_migrate")
        db.update("VM", vm, resident_on=host, scheduled_to_be_resident_on=NULL, domid=m.next_domid())
        for h in (source, host):
            if h != NULL and db.exists("host", h):
                refresh_host_memory(m, db, h)
    m.notify()
    return ""


@implements("VM.assert_can_boot_here")
def vm_assert_can_boot_here(m: XapiModel, ctx: Ctx, self: str, host: str) -> str:
    assert_can_boot_here(m, ctx.db, self, host)
    return ""


@implements("VM.get_possible_hosts")
def vm_get_possible_hosts(m: XapiModel, ctx: Ctx, vm: str) -> list[str]:
    db = ctx.db
    scheduled = db.get("VM", vm)["scheduled_to_be_resident_on"]
    if scheduled != NULL:
        return [scheduled]
    out = []
    for host in db.tables["host"]:
        try:
            assert_can_boot_here(m, db, vm, host)
        except errors.XenAPIError:
            continue
        out.append(host)
    return out


@implements("VM.assert_operation_valid")
def vm_assert_operation_valid(m: XapiModel, ctx: Ctx, self: str, op: str) -> str:
    assert_op(ctx.db, self, op)
    return ""


@implements("VM.update_allowed_operations")
def vm_update_allowed_operations(m: XapiModel, ctx: Ctx, self: str) -> str:
    update_allowed(ctx.db, self)
    m.notify()
    return ""


@implements("VM.compute_memory_overhead")
def vm_compute_memory_overhead(m: XapiModel, ctx: Ctx, vm: str) -> int:
    rec = ctx.db.get("VM", vm)
    return vm_memory_overhead(rec["memory_static_max"], rec["VCPUs_max"])


# -- memory and VCPUs -----------------------------------------------------------------------------

def _set_limits(m: XapiModel, ctx: Ctx, vm: str, op: str, smin: int, smax: int, dmin: int, dmax: int) -> str:
    db = ctx.db
    assert_op(db, vm, op)
    if not (smin <= dmin <= dmax <= smax):
        raise errors.failure("MEMORY_CONSTRAINT_VIOLATION_ORDER")
    rec = db.get("VM", vm)
    if rec["platform"].get("nested-virt") == "true" and not (dmin == dmax == smax):
        raise errors.failure("MEMORY_CONSTRAINT_VIOLATION_MAXPIN", "Nested virtualisation enabled")
    if rec["power_state"] == "Running" and op == "changing_dynamic_range":
        host = rec["resident_on"]
        extra = dmin - rec["memory_dynamic_min"]
        if extra > 0 and host != NULL:
            available = compute_free_memory(m, db, host)
            if extra > available:
                raise errors.failure("HOST_NOT_ENOUGH_FREE_MEMORY", extra, available)
    db.update("VM", vm, memory_static_min=smin, memory_static_max=smax, memory_dynamic_min=dmin,
              memory_dynamic_max=dmax, memory_target=dmin,
              memory_overhead=vm_memory_overhead(smax, rec["VCPUs_max"]))
    update_allowed(db, vm)
    if rec["resident_on"] != NULL and db.exists("host", rec["resident_on"]):
        refresh_host_memory(m, db, rec["resident_on"])
    m.notify()
    return ""


@implements("VM.set_memory_limits")
def vm_set_memory_limits(m: XapiModel, ctx: Ctx, self: str, static_min: int, static_max: int,
                         dynamic_min: int, dynamic_max: int) -> str:
    return _set_limits(m, ctx, self, "changing_memory_limits", static_min, static_max, dynamic_min, dynamic_max)


@implements("VM.set_memory")
def vm_set_memory(m: XapiModel, ctx: Ctx, self: str, value: int) -> str:
    rec = ctx.db.get("VM", self)
    return _set_limits(m, ctx, self, "changing_memory_limits", min(rec["memory_static_min"], value),
                       value, value, value)


@implements("VM.set_memory_static_range")
def vm_set_memory_static_range(m: XapiModel, ctx: Ctx, self: str, min: int, max: int) -> str:
    r = ctx.db.get("VM", self)
    return _set_limits(m, ctx, self, "changing_static_range", min, max, r["memory_dynamic_min"], r["memory_dynamic_max"])


@implements("VM.set_memory_static_max")
def vm_set_memory_static_max(m: XapiModel, ctx: Ctx, self: str, value: int) -> str:
    r = ctx.db.get("VM", self)
    return _set_limits(m, ctx, self, "changing_static_range", r["memory_static_min"], value,
                       r["memory_dynamic_min"], r["memory_dynamic_max"])


@implements("VM.set_memory_static_min")
def vm_set_memory_static_min(m: XapiModel, ctx: Ctx, self: str, value: int) -> str:
    r = ctx.db.get("VM", self)
    return _set_limits(m, ctx, self, "changing_static_range", value, r["memory_static_max"],
                       r["memory_dynamic_min"], r["memory_dynamic_max"])


@implements("VM.set_memory_dynamic_range")
def vm_set_memory_dynamic_range(m: XapiModel, ctx: Ctx, self: str, min: int, max: int) -> str:
    r = ctx.db.get("VM", self)
    return _set_limits(m, ctx, self, "changing_dynamic_range", r["memory_static_min"], r["memory_static_max"], min, max)


@implements("VM.set_memory_dynamic_max")
def vm_set_memory_dynamic_max(m: XapiModel, ctx: Ctx, self: str, value: int) -> str:
    r = ctx.db.get("VM", self)
    return _set_limits(m, ctx, self, "changing_dynamic_range", r["memory_static_min"], r["memory_static_max"],
                       r["memory_dynamic_min"], value)


@implements("VM.set_memory_dynamic_min")
def vm_set_memory_dynamic_min(m: XapiModel, ctx: Ctx, self: str, value: int) -> str:
    r = ctx.db.get("VM", self)
    return _set_limits(m, ctx, self, "changing_dynamic_range", r["memory_static_min"], r["memory_static_max"],
                       value, r["memory_dynamic_max"])


VCPU_RULE = "VCPU values must satisfy: 0 < VCPUs_at_startup ≤ VCPUs_max"


@implements("VM.set_VCPUs_max")
def vm_set_VCPUs_max(m: XapiModel, ctx: Ctx, self: str, value: int) -> str:
    db = ctx.db
    assert_op(db, self, "changing_VCPUs")
    if value < 1 or value < db.get("VM", self)["VCPUs_at_startup"]:
        raise errors.failure("INVALID_VALUE", VCPU_RULE, value)
    db.set("VM", self, "VCPUs_max", value)
    update_allowed(db, self)
    m.notify()
    return ""


@implements("VM.set_VCPUs_at_startup")
def vm_set_VCPUs_at_startup(m: XapiModel, ctx: Ctx, self: str, value: int) -> str:
    db = ctx.db
    if value < 1 or value > db.get("VM", self)["VCPUs_max"]:
        raise errors.failure("INVALID_VALUE", VCPU_RULE, value)
    db.set("VM", self, "VCPUs_at_startup", value)
    m.notify()
    return ""


@implements("VM.set_is_a_template")
def vm_set_is_a_template(m: XapiModel, ctx: Ctx, self: str, value: bool) -> str:
    db = ctx.db
    if value:
        assert_op(db, self, "make_into_template")
        rec = db.get("VM", self)
        if rec["metrics"] != NULL and db.exists("VM_metrics", rec["metrics"]):
            db.destroy("VM_metrics", rec["metrics"])
        db.update("VM", self, metrics=NULL, ha_always_run=False)
    db.set("VM", self, "is_a_template", value)
    update_allowed(db, self)
    m.notify()
    return ""


@implements("VM.create")
def vm_create(m: XapiModel, ctx: Ctx, args: dict[str, Any]) -> str:
    from .api_devices import constructor_record
    rec = constructor_record("VM", args)
    db = ctx.db
    if not (rec["memory_static_min"] <= rec["memory_dynamic_min"] <= rec["memory_dynamic_max"]
            <= rec["memory_static_max"]):
        raise errors.failure("MEMORY_CONSTRAINT_VIOLATION_ORDER")
    other = dict(rec.get("other_config", {}))
    other.setdefault("mac_seed", new_uuid())
    rec["other_config"] = other
    rec["power_state"] = "Halted"
    metrics = db.create("VM_metrics", memory_actual=0, VCPUs_number=rec["VCPUs_at_startup"],
                        last_updated=now(), install_time=now())
    rec["memory_overhead"] = vm_memory_overhead(rec["memory_static_max"], rec["VCPUs_max"])
    vm = db.create("VM", metrics=metrics, **rec)
    update_allowed(db, vm)
    m.notify()
    return vm
