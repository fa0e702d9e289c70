"""Custom handlers: session, task, event, host (xapi_session.ml, xapi_task.ml, xapi_event.ml, xapi_host.ml)."""

from __future__ import annotations

from typing import Any

from . import errors
from .db import NULL, new_ref
from .dispatch import implements
from .models import Ctx, XapiModel
from .wire import now

# -- session -------------------------------------------------------------------------------------


@implements("session.login_with_password")
def login_with_password(m: XapiModel, ctx: Ctx, uname: str, pwd: str, version: str = "",
                        originator: str = "") -> str:
    return m.login(ctx.node, uname, pwd, originator)


@implements("session.slave_local_login_with_password")
def slave_local_login_with_password(m: XapiModel, ctx: Ctx, uname: str, pwd: str) -> str:
    m.check_credentials(uname, pwd)
    ref = new_ref()
    ctx.node.local_sessions[ref] = {"uname": uname, "created": now()}
    return ref


@implements("session.logout")
def logout(m: XapiModel, ctx: Ctx) -> str:
    if ctx.local:
        ctx.node.local_sessions.pop(ctx.session, None)
    elif ctx.db.exists("session", ctx.session):
        ctx.db.destroy("session", ctx.session)
    return ""


@implements("session.local_logout")
def local_logout(m: XapiModel, ctx: Ctx) -> str:
    ctx.node.local_sessions.pop(ctx.session, None)
    return ""


# -- task ------------------------------------------------------------------------------------------


@implements("task.create")
def task_create(m: XapiModel, ctx: Ctx, label: str, description: str) -> str:
    return m.create_task(ctx, label, description)


@implements("task.destroy")
def task_destroy(m: XapiModel, ctx: Ctx, self: str) -> str:
    ctx.db.get("task", self)
    ctx.db.destroy("task", self)
    m.notify()
    return ""


@implements("task.cancel")
def task_cancel(m: XapiModel, ctx: Ctx, task: str) -> str:
    rec = ctx.db.get("task", task)
    if "cancel" not in rec["allowed_operations"] or rec["status"] != "pending":
        raise errors.failure("OPERATION_NOT_ALLOWED", "Task is not cancellable")
    ctx.db.update("task", task, status="cancelling", allowed_operations=[])
    m.notify()
    return ""


@implements("task.set_status")
def task_set_status(m: XapiModel, ctx: Ctx, self: str, value: str) -> str:
    ctx.db.set("task", self, "status", value)
    m.notify()
    return ""


@implements("task.set_progress")
def task_set_progress(m: XapiModel, ctx: Ctx, self: str, value: float) -> str:
    ctx.db.set("task", self, "progress", value)
    m.notify()
    return ""


@implements("task.set_result")
def task_set_result(m: XapiModel, ctx: Ctx, self: str, value: str) -> str:
    ctx.db.set("task", self, "result", value)
    m.notify()
    return ""


@implements("task.set_error_info")
def task_set_error_info(m: XapiModel, ctx: Ctx, self: str, value: list[str]) -> str:
    ctx.db.set("task", self, "error_info", value)
    m.notify()
    return ""


# -- event -----------------------------------------------------------------------------------------


@implements("event.from")
def event_from(m: XapiModel, ctx: Ctx, classes: list[str], token: str, timeout: float) -> dict[str, Any]:
    return m.event_from(ctx.db, classes, token, timeout)


@implements("event.get_current_id")
def event_get_current_id(m: XapiModel, ctx: Ctx) -> int:
    return ctx.db.gen


@implements("event.inject")
def event_inject(m: XapiModel, ctx: Ctx, class_: str, ref: str) -> str:
    real = m.dm.class_by_lower(class_)
    if real is None:
        raise errors.failure("EVENT_SUBSCRIPTION_PARSE_FAILURE", class_)
    ctx.db.get(real, ref)
    token = f"{ctx.db.gen:020d},{0:020d}"
    ctx.db.touch(ref)
    m.notify()
    return token


# The deprecated per-session queue (event.register / event.next / event.unregister).


@implements("event.register")
def event_register(m: XapiModel, ctx: Ctx, classes: list[str]) -> str:
    m._parse_subscriptions(classes)
    reg = m.registrations.setdefault(ctx.session, {"classes": set(), "since": ctx.db.gen})
    reg["classes"].update(classes)
    return ""


@implements("event.unregister")
def event_unregister(m: XapiModel, ctx: Ctx, classes: list[str]) -> str:
    reg = m.registrations.get(ctx.session)
    if reg is not None:
        reg["classes"].difference_update(classes)
    return ""


@implements("event.next")
def event_next(m: XapiModel, ctx: Ctx) -> list[dict[str, Any]]:
    """Blocks until an event for a registered class exists (xapi blocks without a timeout)."""
    reg = m.registrations.get(ctx.session)
    if reg is None:
        raise errors.failure("SESSION_NOT_REGISTERED", ctx.session)
    while True:
        subs = m._parse_subscriptions(sorted(reg["classes"]))
        events = m._events_since(ctx.db, reg["since"], subs)
        if events or m.stopping.is_set():
            break
        m.cond.wait(1.0)
        if not ctx.db.exists("session", ctx.session):
            raise errors.failure("SESSION_INVALID", ctx.session)
    reg["since"] = ctx.db.gen
    out = []
    for e in events:
        rec = dict(e)
        snapshot = rec.get("snapshot")
        rec["obj_uuid"] = snapshot["uuid"] if isinstance(snapshot, dict) else ""
        out.append(rec)
    return out


# -- host ------------------------------------------------------------------------------------------


def compute_free_memory(m: XapiModel, db: Any, host: str, exclude_vm: str = NULL) -> int:
    """memory_total - host overhead - sum(dynamic_min + overhead) of resident/scheduled VMs."""
    hrec = db.get("host", host)
    metrics = db.get("host_metrics", hrec["metrics"])
    used = hrec["memory_overhead"]
    for vm, rec in db.all("VM"):
        if vm == exclude_vm:
            continue
        if rec["resident_on"] == host or rec["scheduled_to_be_resident_on"] == host:
            used += rec["memory_dynamic_min"] + rec["memory_overhead"]
    return int(max(0, metrics["memory_total"] - used))


def refresh_host_memory(m: XapiModel, db: Any, host: str) -> None:
    hrec = db.get("host", host)
    if db.exists("host_metrics", hrec["metrics"]):
        db.update("host_metrics", hrec["metrics"], memory_free=compute_free_memory(m, db, host),
                  last_updated=now())


@implements("host.compute_free_memory")
def host_compute_free_memory(m: XapiModel, ctx: Ctx, host: str) -> int:
    return compute_free_memory(m, ctx.db, host)


@implements("host.get_servertime", "host.get_server_localtime")
def host_get_servertime(m: XapiModel, ctx: Ctx, host: str) -> Any:
    ctx.db.get("host", host)
    return now()


@implements("host.disable")
def host_disable(m: XapiModel, ctx: Ctx, host: str, auto_enable: bool = True) -> str:
    ctx.db.set("host", host, "enabled", False)
    m.notify()
    return ""


@implements("host.enable")
def host_enable(m: XapiModel, ctx: Ctx, host: str) -> str:
    ctx.db.set("host", host, "enabled", True)
    m.notify()
    return ""


@implements("host.get_management_interface")
def host_get_management_interface(m: XapiModel, ctx: Ctx, host: str) -> str:
    ctx.db.get("host", host)
    for pif, rec in ctx.db.all("PIF"):
        if rec["host"] == host and rec["management"]:
            return pif
    raise errors.failure("HOST_HAS_NO_MANAGEMENT_IP")


@implements("host.is_in_emergency_mode")
def host_is_in_emergency_mode(m: XapiModel, ctx: Ctx) -> bool:
    node = ctx.node
    if node.is_master:
        return False
    master = m.node_by_address(node.master_address)
    return master is None or not master.alive or not master.is_master
