"""More device, storage and host handlers: VBD/VIF plug/unplug, CD insert/eject, VDI clone/copy/
snapshot/resize, SR create/scan/forget/destroy, VM.snapshot, host shutdown/reboot/evacuate."""

from __future__ import annotations

import threading
from typing import Any

from . import errors
from .api_core import refresh_host_memory
from .api_vm import (
    _copy_vm,
    assert_can_boot_here,
    choose_host,
    new_vdi,
    sr_allocate,
    sr_release,
    update_allowed,
)
from .db import NULL, Database
from .dispatch import implements
from .models import Ctx, XapiModel
from .wire import now

SR_TYPES = ["ext", "lvm", "nfs", "iso", "udev", "file", "lvmoiscsi", "lvmohba", "smb"]


def _vm_running(db: Database, vm: str) -> None:
    state = db.get("VM", vm)["power_state"]
    if state != "Running":
        raise errors.failure("VM_BAD_POWER_STATE", vm, "running", state.lower())


def _plug(m: XapiModel, ctx: Ctx, cls: str, ref: str, attach: bool, force: bool = False) -> str:
    db = ctx.db
    rec = db.get(cls, ref)
    _vm_running(db, rec["VM"])
    if attach and rec["currently_attached"]:
        raise errors.failure("DEVICE_ALREADY_ATTACHED", ref)
    if not attach and not rec["currently_attached"] and not force:
        raise errors.failure("DEVICE_ALREADY_DETACHED", ref)
    db.set(cls, ref, "currently_attached", attach)
    m.notify()
    return ""


@implements("VBD.plug")
def vbd_plug(m: XapiModel, ctx: Ctx, self: str) -> str:
    return _plug(m, ctx, "VBD", self, True)


@implements("VBD.unplug")
def vbd_unplug(m: XapiModel, ctx: Ctx, self: str) -> str:
    return _plug(m, ctx, "VBD", self, False)


@implements("VBD.unplug_force")
def vbd_unplug_force(m: XapiModel, ctx: Ctx, self: str) -> str:
    return _plug(m, ctx, "VBD", self, False, force=True)


@implements("VIF.plug")
def vif_plug(m: XapiModel, ctx: Ctx, self: str) -> str:
    return _plug(m, ctx, "VIF", self, True)


@implements("VIF.unplug")
def vif_unplug(m: XapiModel, ctx: Ctx, self: str) -> str:
    return _plug(m, ctx, "VIF", self, False)


@implements("VIF.unplug_force")
def vif_unplug_force(m: XapiModel, ctx: Ctx, self: str) -> str:
    return _plug(m, ctx, "VIF", self, False, force=True)


@implements("VBD.insert")
def vbd_insert(m: XapiModel, ctx: Ctx, vbd: str, vdi: str) -> str:
    db = ctx.db
    rec = db.get("VBD", vbd)
    db.get("VDI", vdi)
    if rec["type"] not in ("CD", "Floppy"):
        raise errors.failure("VBD_NOT_REMOVABLE_MEDIA", vbd)
    if not rec["empty"]:
        raise errors.failure("VBD_NOT_EMPTY", vbd)
    db.update("VBD", vbd, VDI=vdi, empty=False)
    m.notify()
    return ""


@implements("VBD.eject")
def vbd_eject(m: XapiModel, ctx: Ctx, vbd: str) -> str:
    db = ctx.db
    rec = db.get("VBD", vbd)
    if rec["type"] not in ("CD", "Floppy"):
        raise errors.failure("VBD_NOT_REMOVABLE_MEDIA", vbd)
    if rec["empty"]:
        raise errors.failure("VBD_IS_EMPTY", vbd)
    db.update("VBD", vbd, VDI=NULL, empty=True)
    m.notify()
    return ""


# -- VDI ------------------------------------------------------------------------------------------

def _vdi_like(db: Database, vdi: str, sr: str, physical: int, **extra: Any) -> str:
    d = db.get("VDI", vdi)
    return new_vdi(db, sr, name=d["name_label"], size=d["virtual_size"], vtype=d["type"],
                   physical=physical, name_description=d["name_description"],
                   other_config=dict(d["other_config"]), **extra)


@implements("VDI.clone")
def vdi_clone(m: XapiModel, ctx: Ctx, vdi: str, driver_params: dict[str, str] | None = None) -> str:
    d = ctx.db.get("VDI", vdi)
    m.delay("VDI.clone")
    new = _vdi_like(ctx.db, vdi, d["SR"], 0, sm_config={"vhd-parent": d["uuid"]})
    m.notify()
    return new


@implements("VDI.snapshot")
def vdi_snapshot(m: XapiModel, ctx: Ctx, vdi: str, driver_params: dict[str, str] | None = None) -> str:
    d = ctx.db.get("VDI", vdi)
    m.delay("VDI.snapshot")
    new = _vdi_like(ctx.db, vdi, d["SR"], 0, is_a_snapshot=True, snapshot_of=vdi,
                    snapshot_time=now(), read_only=True)
    m.notify()
    return new


@implements("VDI.copy")
def vdi_copy(m: XapiModel, ctx: Ctx, vdi: str, sr: str = NULL, base_vdi: str = NULL,
             into_vdi: str = NULL) -> str:
    db = ctx.db
    d = db.get("VDI", vdi)
    if into_vdi != NULL:
        target = db.get("VDI", into_vdi)
        if target["read_only"]:
            raise errors.failure("VDI_READONLY", into_vdi)
        if target["virtual_size"] < d["virtual_size"]:
            raise errors.failure("VDI_TOO_SMALL", into_vdi, d["virtual_size"])
        m.delay("VDI.copy")
        return into_vdi
    if sr == NULL:
        sr = d["SR"]
    db.get("SR", sr)
    m.delay("VDI.copy")
    new = _vdi_like(db, vdi, sr, d["physical_utilisation"] or d["virtual_size"])
    m.notify()
    return new


@implements("VDI.resize")
def vdi_resize(m: XapiModel, ctx: Ctx, vdi: str, size: int) -> str:
    db = ctx.db
    d = db.get("VDI", vdi)
    if size < d["virtual_size"]:
        raise errors.failure("SR_BACKEND_FAILURE_79", "", "VDI Invalid size",
                             f"shrinking from {d['virtual_size']} to {size} is not supported")
    grow = size - d["virtual_size"]
    thick = d["physical_utilisation"] >= d["virtual_size"]
    sr_allocate(db, d["SR"], grow if thick else 0, grow)
    db.update("VDI", vdi, virtual_size=size,
              physical_utilisation=d["physical_utilisation"] + (grow if thick else 0))
    m.notify()
    return ""


# -- SR -------------------------------------------------------------------------------------------

@implements("SR.get_supported_types")
def sr_get_supported_types(m: XapiModel, ctx: Ctx) -> list[str]:
    return list(SR_TYPES)


@implements("SR.scan")
def sr_scan(m: XapiModel, ctx: Ctx, sr: str) -> str:
    ctx.db.get("SR", sr)
    m.delay("SR.scan")
    return ""


@implements("SR.create")
def sr_create(m: XapiModel, ctx: Ctx, host: str, device_config: dict[str, str], physical_size: int,
              name_label: str, name_description: str, type: str, content_type: str, shared: bool,
              sm_config: dict[str, str] | None = None) -> str:
    db = ctx.db
    db.get("host", host)
    if type not in SR_TYPES:
        raise errors.failure("SR_UNKNOWN_DRIVER", type)
    m.delay("SR.create")
    size = physical_size if physical_size > 0 else 1024**4
    sr = db.create("SR", name_label=name_label, name_description=name_description, type=type,
                   content_type=content_type, shared=shared, physical_size=size,
                   physical_utilisation=0, virtual_allocation=0, sm_config=dict(sm_config or {}),
                   other_config={}, allowed_operations=["scan", "destroy", "forget", "plug", "unplug",
                                                        "vdi_create", "vdi_destroy"])
    hosts = list(db.tables["host"]) if shared else [host]
    for h in hosts:
        db.create("PBD", host=h, SR=sr, device_config=dict(device_config), currently_attached=True)
    m.notify()
    return sr


def _sr_remove(m: XapiModel, ctx: Ctx, sr: str, destroy: bool) -> str:
    db = ctx.db
    db.get("SR", sr)
    if any(db.get("PBD", p)["currently_attached"] for p in db.reverse("SR", "PBDs", sr)):
        raise errors.failure("SR_HAS_PBD", sr)
    for vdi in db.reverse("SR", "VDIs", sr):
        for vbd in db.reverse("VDI", "VBDs", vdi):
            db.update("VBD", vbd, VDI=NULL, empty=True)
        db.destroy("VDI", vdi)
    for pbd in db.reverse("SR", "PBDs", sr):
        db.destroy("PBD", pbd)
    pool = db.one("pool")
    for field in ("default_SR", "suspend_image_SR", "crash_dump_SR"):
        if db.get("pool", pool)[field] == sr:
            db.set("pool", pool, field, NULL)
    db.destroy("SR", sr)
    m.notify()
    return ""


@implements("SR.forget")
def sr_forget(m: XapiModel, ctx: Ctx, sr: str) -> str:
    return _sr_remove(m, ctx, sr, destroy=False)


@implements("SR.destroy")
def sr_destroy(m: XapiModel, ctx: Ctx, sr: str) -> str:
    return _sr_remove(m, ctx, sr, destroy=True)


# -- VM.snapshot ----------------------------------------------------------------------------------

@implements("VM.snapshot")
def vm_snapshot(m: XapiModel, ctx: Ctx, vm: str, new_name: str, ignore_vdis: list[str] | None = None) -> str:
    """A disk-only snapshot: a template VM with is_a_snapshot, snapshot_of, snapshot_time."""
    from .api_vm import vm_operation
    db = ctx.db
    for v in ignore_vdis or []:
        db.get("VDI", v)
    with vm_operation(m, ctx, vm, "snapshot"):
        m.delay("VM.snapshot")
        power = db.get("VM", vm)["power_state"]
        # _copy_vm copies from a halted view; a snapshot of a running VM is still Halted
        new = _copy_vm(m, ctx, vm, new_name, None)
        db.update("VM", new, is_a_template=True, is_a_snapshot=True, snapshot_of=vm,
                  snapshot_time=now(), power_state="Halted",
                  snapshot_info={"power-state-at-snapshot": power})
        for vbd in db.reverse("VM", "VBDs", new):
            vdi = db.get("VBD", vbd)["VDI"]
            if vdi != NULL and db.exists("VDI", vdi):
                db.update("VDI", vdi, is_a_snapshot=True, snapshot_time=now())
        update_allowed(db, new)
    m.notify()
    return new


# -- host power and evacuation --------------------------------------------------------------------

def _resident(db: Database, host: str) -> list[str]:
    return [v for v, r in db.all("VM") if r["resident_on"] == host and not r["is_control_domain"]
            and r["power_state"] != "Halted"]


def _power_off_later(m: XapiModel, name: str, reboot: bool) -> None:
    def run() -> None:
        m.kill_host(name)
        if reboot:
            if m.stopping.wait(max(0.2, m.latency.delay("host.reboot"))):
                return
            with m.lock:  # xapi enables the host again as it finishes booting
                for db in m.live_pool_dbs():
                    try:
                        db.set("host", db.by_uuid("host", m.nodes[name].uuid), "enabled", True)
                    except errors.XenAPIError:
                        continue
            m.revive_host(name)
    timer = threading.Timer(0.1, run)  # after the reply left, as a real host goes down
    timer.daemon = True
    timer.start()


def _power_checks(db: Database, host: str) -> None:
    if db.get("host", host)["enabled"]:
        raise errors.failure("HOST_NOT_DISABLED")
    if _resident(db, host):
        raise errors.failure("HOST_HAS_RESIDENT_VMS", host)


@implements("host.shutdown")
def host_shutdown(m: XapiModel, ctx: Ctx, host: str) -> str:
    _power_checks(ctx.db, host)
    _power_off_later(m, m.node_of_host(ctx.db, host).name, reboot=False)
    return ""


@implements("host.reboot")
def host_reboot(m: XapiModel, ctx: Ctx, host: str) -> str:
    _power_checks(ctx.db, host)
    _power_off_later(m, m.node_of_host(ctx.db, host).name, reboot=True)
    return ""


@implements("host.power_on")
def host_power_on(m: XapiModel, ctx: Ctx, host: str) -> str:
    if ctx.db.get("host", host)["power_on_mode"] == "":
        raise errors.failure("HOST_POWER_ON_MODE_DISABLED")
    m.revive_host(m.node_of_host(ctx.db, host).name)
    return ""


def _blockers(m: XapiModel, db: Database, host: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    others = [h for h in db.tables["host"] if h != host]
    for vm in _resident(db, host):
        reasons: list[str] = []
        for h in others:
            try:
                assert_can_boot_here(m, db, vm, h)
            except errors.XenAPIError as e:
                reasons = e.description
                continue
            reasons = []
            break
        else:
            if not others:
                reasons = ["NO_HOSTS_AVAILABLE"]
        if reasons:
            out[vm] = reasons
    return out


@implements("host.get_vms_which_prevent_evacuation")
def host_get_vms_which_prevent_evacuation(m: XapiModel, ctx: Ctx, self: str) -> dict[str, list[str]]:
    ctx.db.get("host", self)
    return _blockers(m, ctx.db, self)


@implements("host.assert_can_evacuate")
def host_assert_can_evacuate(m: XapiModel, ctx: Ctx, host: str) -> str:
    ctx.db.get("host", host)
    blockers = _blockers(m, ctx.db, host)
    if blockers:
        first = next(iter(blockers.values()))
        raise errors.failure(first[0], *first[1:])
    return ""


@implements("host.evacuate")
def host_evacuate(m: XapiModel, ctx: Ctx, host: str, network: str = NULL,
                  evacuate_batch_size: int = 0) -> str:
    db = ctx.db
    db.get("host", host)
    host_assert_can_evacuate(m, ctx, host)
    was_enabled = db.get("host", host)["enabled"]
    db.set("host", host, "enabled", False)  # keep placement off it while we move VMs
    try:
        for vm in _resident(db, host):
            target = choose_host(m, db, vm)
            m.delay("VM.pool_migrate")
            db.update("VM", vm, resident_on=target, domid=m.next_domid())
            refresh_host_memory(m, db, target)
        refresh_host_memory(m, db, host)
    finally:
        db.set("host", host, "enabled", was_enabled)
    m.notify()
    return ""


@implements("host.list_methods")
def host_list_methods(m: XapiModel, ctx: Ctx) -> list[str]:
    return sorted(msg.wire_name for msg in m.dm.all_messages())


_ = sr_release  # re-exported for symmetry with sr_allocate
