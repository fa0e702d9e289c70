"""Pool handlers (xapi_pool.ml join_common/pre_join_checks, eject, designate_new_master,
emergency_transition_to_master, recover_slaves, sync_database)."""

from __future__ import annotations

import dataclasses
from typing import Any

from . import errors
from .db import NULL, Database, new_ref
from .dispatch import implements
from .fixtures import build_host
from .models import Ctx, Node, XapiModel
from .wire import now


def _pool(db: Database) -> str:
    return db.one("pool")


def _remap(value: Any, refmap: dict[str, str]) -> Any:
    if isinstance(value, str):
        return refmap.get(value, value)
    if isinstance(value, list):
        return [_remap(v, refmap) for v in value]
    if isinstance(value, dict):
        return {refmap.get(k, k): _remap(v, refmap) for k, v in value.items()}
    return value


def _join_checks(m: XapiModel, ctx: Ctx, master: Node, force: bool) -> None:
    me = ctx.db
    mdb = master.db
    assert mdb is not None
    my_host = m.host_ref(me, ctx.node)
    # management interface
    if not any(r["management"] and r["host"] == my_host for _, r in me.all("PIF")):
        raise errors.failure("HOST_STILL_BOOTING")
    if me.get("pool", _pool(me))["ha_enabled"]:
        raise errors.failure("HA_IS_ENABLED")
    if mdb.get("pool", _pool(mdb))["ha_enabled"]:
        raise errors.failure("HA_IS_ENABLED")
    master_host = mdb.get("pool", _pool(mdb))["master"]
    if mdb.get("host", master_host)["uuid"] == ctx.node.uuid:
        msg = "Host is already part of a pool" if len(me.tables["host"]) > 1 else \
            "Host cannot become slave of itself"
        raise errors.failure("OPERATION_NOT_ALLOWED", msg)
    if len(me.tables["host"]) > 1:
        raise errors.failure("JOINING_HOST_CANNOT_BE_MASTER_OF_OTHER_HOSTS")
    if any(not r["is_control_domain"] and r["power_state"] == "Running" for _, r in me.all("VM")):
        raise errors.failure("JOINING_HOST_CANNOT_HAVE_RUNNING_VMS")
    if any(r["current_operations"] for _, r in me.all("VM")):
        raise errors.failure("JOINING_HOST_CANNOT_HAVE_VMS_WITH_CURRENT_OPERATIONS")
    mine = me.get("host", my_host)["software_version"]
    theirs = mdb.get("host", master_host)["software_version"]

    def compat(v: dict[str, str]) -> tuple[str, str]:
        return v.get("platform_version", ""), v.get("product_brand", v.get("platform_name", ""))
    if compat(mine) != compat(theirs):
        raise errors.failure("HOSTS_NOT_COMPATIBLE")
    if not force:
        keys = ("platform_version", "product_brand", "build_number", "git_id")
        if tuple(mine.get(k, "") for k in keys) != tuple(theirs.get(k, "") for k in keys):
            raise errors.failure("HOSTS_NOT_HOMOGENEOUS", "Software version differs")
        if me.get("host", my_host)["cpu_info"].get("vendor") != \
                mdb.get("host", master_host)["cpu_info"].get("vendor"):
            raise errors.failure("HOSTS_NOT_HOMOGENEOUS", "CPUs differ")
    if any(r["shared"] and not r["is_tools_sr"] for _, r in me.all("SR")):
        raise errors.failure("JOINING_HOST_CANNOT_CONTAIN_SHARED_SRS")
    if me.get("host", my_host)["external_auth_type"] != mdb.get("host", master_host)["external_auth_type"]:
        raise errors.failure("POOL_JOINING_EXTERNAL_AUTH_MISMATCH")
    mine_api = (me.get("host", my_host)["API_version_major"], me.get("host", my_host)["API_version_minor"])
    their_api = (mdb.get("host", master_host)["API_version_major"],
                 mdb.get("host", master_host)["API_version_minor"])
    if mine_api != their_api:
        raise errors.failure("POOL_JOINING_HOST_MUST_HAVE_SAME_API_VERSION",
                             f"{mine_api[0]}.{mine_api[1]}", f"{their_api[0]}.{their_api[1]}")
    if mine.get("db_schema") != theirs.get("db_schema"):
        raise errors.failure("POOL_JOINING_HOST_MUST_HAVE_SAME_DB_SCHEMA",
                             mine.get("db_schema", ""), theirs.get("db_schema", ""))


def _merge_into_master(m: XapiModel, joiner: Node, jdb: Database, mdb: Database) -> None:
    """update_non_vm_metadata + the metadata export/import: the joiner's objects enter the pool DB."""
    refmap: dict[str, str] = {}
    skip: set[str] = set()
    # networks merge by bridge; the tools SR merges with the pool's
    for net, rec in jdb.all("network"):
        same = [r for r, mrec in mdb.all("network") if mrec["bridge"] == rec["bridge"]]
        if same:
            refmap[net] = same[0]
            skip.add(net)
    for sr, rec in jdb.all("SR"):
        if rec["is_tools_sr"]:
            same = [r for r, mrec in mdb.all("SR") if mrec["is_tools_sr"]]
            if same:
                refmap[sr] = same[0]
                skip.add(sr)
    for vm, rec in jdb.all("VM"):
        if rec["is_default_template"]:  # the master has its own default templates
            skip.add(vm)
            if rec["metrics"] != NULL:
                skip.add(rec["metrics"])
    for cls in ("pool", "session", "task"):
        skip.update(jdb.tables[cls])
    order = ["host_metrics", "host", "host_cpu", "network", "PIF", "SR", "PBD", "VDI", "VM_metrics",
             "VM_guest_metrics", "VM", "VBD", "VIF"]
    for cls in order:
        for ref in jdb.tables[cls]:
            if ref not in skip:
                refmap[ref] = new_ref()
    for cls in order:
        for ref, rec in jdb.all(cls):
            if ref in skip:
                continue
            values = {k: _remap(v, refmap) for k, v in rec.items()}
            mdb.create(cls, ref=refmap[ref], **values)
    new_host = refmap[m.host_ref(jdb, joiner)]
    # shared SRs of the pool get a PBD on the new host (create_storage on slave startup)
    for sr, rec in mdb.all("SR"):
        if rec["shared"] and not any(mdb.get("PBD", p)["host"] == new_host for p in mdb.reverse("SR", "PBDs", sr)):
            template = next((mdb.get("PBD", p) for p in mdb.reverse("SR", "PBDs", sr)), None)
            mdb.create("PBD", host=new_host, SR=sr, currently_attached=True,
                       device_config=dict(template["device_config"]) if template else {})


def _do_join(m: XapiModel, ctx: Ctx, master_address: str, username: str, password: str, force: bool) -> str:
    master = m.node_by_address(master_address)
    if master is None or not master.alive:
        raise errors.failure("JOINING_HOST_CONNECTION_FAILED")
    if not master.is_master:  # the remote login is refused
        raise errors.failure("HOST_IS_SLAVE", master.master_address)
    m.check_credentials(username, password)
    _join_checks(m, ctx, master, force)
    m.delay("pool.join")
    # the world may have moved while we slept
    if not (master.alive and master.is_master) or not ctx.node.is_master:
        raise errors.failure("JOINING_HOST_CONNECTION_FAILED")
    assert master.db is not None
    _join_checks(m, ctx, master, force)
    _merge_into_master(m, ctx.node, ctx.db, master.db)
    m.refresh_allowed(master.db)
    joiner = ctx.node
    joiner.role = "slave"
    joiner.master_address = master.address
    joiner.db = None
    joiner.local_sessions.clear()
    joiner.replica = master.db.clone()
    m.notify()
    return ""


@implements("pool.join")
def pool_join(m: XapiModel, ctx: Ctx, master_address: str, master_username: str, master_password: str) -> str:
    return _do_join(m, ctx, master_address, master_username, master_password, False)


@implements("pool.join_force")
def pool_join_force(m: XapiModel, ctx: Ctx, master_address: str, master_username: str,
                    master_password: str) -> str:
    return _do_join(m, ctx, master_address, master_username, master_password, True)


@implements("pool.eject")
def pool_eject(m: XapiModel, ctx: Ctx, host: str) -> str:
    db = ctx.db
    db.get("host", host)
    if db.get("pool", _pool(db))["master"] == host:
        raise errors.failure("INTERNAL_ERROR", "Cannot_eject_master")
    if db.get("pool", _pool(db))["ha_enabled"]:
        raise errors.failure("HA_IS_ENABLED")
    for _vm, rec in db.all("VM"):
        if rec["resident_on"] == host and not rec["is_control_domain"] and rec["power_state"] != "Halted":
            raise errors.failure("OPERATION_NOT_ALLOWED", "VM resident on host")
    node = m.node_of_host(db, host)
    m.delay("pool.eject")
    # forget the host's local SRs, its devices, control domain and the host record
    for sr, rec in db.all("SR"):
        pbds = db.reverse("SR", "PBDs", sr)
        if pbds and all(db.get("PBD", p)["host"] == host for p in pbds) and not rec["shared"]:
            for vdi in db.reverse("SR", "VDIs", sr):
                for vbd in db.reverse("VDI", "VBDs", vdi):
                    db.destroy("VBD", vbd)
                db.destroy("VDI", vdi)
            for p in pbds:
                db.destroy("PBD", p)
            db.destroy("SR", sr)
    for cls in ("PBD", "PIF", "host_cpu"):
        for ref, rec in db.all(cls):
            if rec["host"] == host:
                db.destroy(cls, ref)
    for vm, rec in db.all("VM"):
        if rec["resident_on"] == host and rec["is_control_domain"]:
            if db.exists("VM_metrics", rec["metrics"]):
                db.destroy("VM_metrics", rec["metrics"])
            db.destroy("VM", vm)
        elif rec["affinity"] == host:
            db.set("VM", vm, "affinity", NULL)
    metrics = db.get("host", host)["metrics"]
    db.destroy("host", host)
    if db.exists("host_metrics", metrics):
        db.destroy("host_metrics", metrics)
    # the ejected host reboots as a fresh standalone master (its local disks are lost)
    fresh = Database()
    build_host(fresh, dataclasses.replace(node.spec, shared_sr=False, node_template=False))
    m.refresh_allowed(fresh)
    node.role = "master"
    node.master_address = ""
    node.db = fresh
    node.replica = None
    node.local_sessions.clear()
    m.notify()
    return ""


def _clear_sessions(db: Database) -> None:
    for ref in list(db.tables["session"]):
        db.destroy("session", ref)


@implements("pool.designate_new_master")
def pool_designate_new_master(m: XapiModel, ctx: Ctx, host: str) -> str:
    db = ctx.db
    old = ctx.node
    target = m.node_of_host(db, host)
    if target is old:
        return ""
    if db.get("pool", _pool(db))["ha_enabled"]:
        raise errors.failure("HA_IS_ENABLED")
    if not target.alive:
        raise errors.failure("HOST_OFFLINE", host)
    m.sync_database(old)
    m.delay("pool.designate_new_master")
    db.set("pool", _pool(db), "master", host)
    _clear_sessions(db)
    slaves = list(m.slaves_of(old))
    target.role, target.master_address, target.db, target.replica = "master", "", db, None
    old.role, old.master_address, old.db = "slave", target.address, None
    old.replica = db.clone()
    old.local_sessions.clear()
    for s in slaves:
        if s is not target:
            s.master_address = target.address
    m.notify()
    return ""


@implements("pool.emergency_transition_to_master")
def pool_emergency_transition_to_master(m: XapiModel, ctx: Ctx) -> str:
    node = ctx.node
    if node.is_master:
        return ""
    if node.replica is None:
        raise errors.failure("HOST_STILL_BOOTING")
    if node.replica.get("pool", _pool(node.replica))["ha_enabled"]:
        raise errors.failure("HA_IS_ENABLED")
    m.delay("pool.emergency_transition_to_master")
    db = node.replica.clone()
    me = m.host_ref(db, node)
    db.set("pool", _pool(db), "master", me)
    _clear_sessions(db)
    for _ref, rec in db.all("host"):
        other = m.node_by_uuid(rec["uuid"])
        live = other is not None and other.alive and (other is node or other.master_address == node.address)
        if db.exists("host_metrics", rec["metrics"]):
            db.update("host_metrics", rec["metrics"], live=live, last_updated=now())
    node.role, node.master_address, node.db, node.replica = "master", "", db, None
    m.notify()
    return ""


@implements("pool.emergency_reset_master")
def pool_emergency_reset_master(m: XapiModel, ctx: Ctx, master_address: str) -> str:
    node = ctx.node
    target = m.node_by_address(master_address)
    if target is None or not target.alive or not target.is_master:
        raise errors.failure("INTERNAL_ERROR", f"cannot contact master {master_address}")
    _become_slave(m, node, target)
    return ""


def _become_slave(m: XapiModel, node: Node, master: Node) -> None:
    assert master.db is not None
    node.role, node.master_address, node.db = "slave", master.address, None
    node.replica = master.db.clone()
    node.local_sessions.clear()
    m.set_live(node, node.alive)


@implements("pool.recover_slaves")
def pool_recover_slaves(m: XapiModel, ctx: Ctx) -> list[str]:
    db = ctx.db
    me = ctx.node
    recovered = []
    for ref, rec in db.all("host"):
        other = m.node_by_uuid(rec["uuid"])
        if other is None or other is me or not other.alive:
            continue
        if other.role == "slave" and other.master_address == me.address:
            continue
        _become_slave(m, other, me)
        recovered.append(ref)
    m.notify()
    return recovered


@implements("pool.sync_database")
def pool_sync_database(m: XapiModel, ctx: Ctx) -> str:
    m.sync_database(ctx.node)
    return ""


@implements("pool.is_slave")
def pool_is_slave(m: XapiModel, ctx: Ctx, host: str) -> bool:
    return not ctx.node.is_master
