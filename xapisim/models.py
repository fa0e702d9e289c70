"""State and behaviour of the simulated hosts (moto's ``models``): nodes, pools, sessions, tasks, events.

Every host is a ``Node`` (its own xapi): a master holds its pool's live ``Database``; a slave keeps a
replica (the periodic full backup real slaves keep) and refuses normal calls with ``HOST_IS_SLAVE``.
One lock (a ``Condition`` over an ``RLock``) guards all state; handlers that take time (the latency
model) release it while they sleep, so concurrent clients and ``event.from`` waiters see progress.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .backends.base import GuestBackend, GuestSpec
from .datamodel import load
from .db import NULL, Database, new_ref
from .fixtures import HostSpec, build_host
from .latency import LatencyModel
from .wire import Int32, now, task_result

log = logging.getLogger("xapisim")

SESSION_LIMIT = 500  # per originator (xapi_globs.ml max_sessions_per_originator)
EMERGENCY_CALLS = {
    "pool.emergency_transition_to_master",
    "pool.emergency_reset_master",
    "pool.is_slave",
    "session.slave_local_login_with_password",
    "session.slave_local_login",
    "session.local_logout",
    "host.is_in_emergency_mode",
    "host.get_servertime",
}


@dataclass
class Node:
    """One simulated host: its own management address and xapi."""

    name: str
    address: str
    uuid: str
    spec: HostSpec
    role: str = "master"  # "master" | "slave"
    master_address: str = ""
    db: Database | None = None  # live pool DB (masters only)
    replica: Database | None = None  # last full backup from the master (slaves)
    alive: bool = True
    local_sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    replica_time: float = 0.0

    @property
    def is_master(self) -> bool:
        return self.role == "master"


@dataclass
class Ctx:
    """Per-call context: which host answered, which DB the call acts on, the task if async."""

    node: Node
    db: Database
    session: str
    local: bool = False
    task: str = NULL
    op_ref: str = ""

    def __post_init__(self) -> None:
        if not self.op_ref:
            self.op_ref = self.task if self.task != NULL else new_ref()


class XapiModel:
    def __init__(
        self,
        specs: list[HostSpec],
        backend: GuestBackend,
        *,
        username: str,
        password: str,
        latency: LatencyModel,
        sync_interval: float = 300.0,
        seed: int | None = None,
    ) -> None:
        self.dm = load()
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.backend = backend
        self.username = username
        self.password = password
        self.latency = latency
        self.sync_interval = sync_interval
        self.rng = random.Random(seed)
        self.nodes: dict[str, Node] = {}
        self.stopping = threading.Event()
        self.on_kill: Callable[[Node], None] = lambda node: None
        self.on_revive: Callable[[Node], None] = lambda node: None
        self._domid = 0
        self.local = threading.local()  # .task = (db, task ref) inside an Async worker thread
        self.registrations: dict[str, dict[str, Any]] = {}  # event.register state per session
        self._sync_thread: threading.Thread | None = None
        for spec in specs:
            db = Database()
            build_host(db, spec)
            self.refresh_allowed(db)
            self.nodes[spec.name] = Node(spec.name, spec.address, spec.uuid, spec, db=db)

    @staticmethod
    def refresh_allowed(db: Database) -> None:
        from .api_vm import update_allowed
        for vm in list(db.tables["VM"]):
            update_allowed(db, vm)

    # -- lifecycle -------------------------------------------------------------------------------
    def start_sync(self) -> None:
        if self.sync_interval > 0 and self._sync_thread is None:
            self._sync_thread = threading.Thread(target=self._sync_loop, name="xapisim-dbsync",
                                                 daemon=True)
            self._sync_thread.start()

    def _sync_loop(self) -> None:
        while not self.stopping.wait(self.sync_interval):
            with self.lock:
                for node in list(self.nodes.values()):
                    if node.is_master and node.alive:
                        self.sync_database(node)

    def reset(self) -> None:
        """Back to N fresh standalone hosts (moto's reset()): guests destroyed, sessions gone."""
        with self.lock:
            uuids = {rec["uuid"] for db in self.live_pool_dbs() for _, rec in db.all("VM")
                     if not rec["is_control_domain"]}
            for node in self.nodes.values():
                db = Database()
                build_host(db, node.spec)
                self.refresh_allowed(db)
                node.role, node.master_address, node.db, node.replica = "master", "", db, None
                node.local_sessions.clear()
            self.registrations.clear()
            self.notify()
        for uuid in uuids:
            try:
                self.backend.destroy(uuid)
            except Exception:  # a guest that never started
                log.debug("backend destroy %s failed during reset", uuid, exc_info=True)
        for node in self.nodes.values():
            if not node.alive:
                self.revive_host(node.name)

    def stop(self) -> None:
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        if self._sync_thread is not None:
            self._sync_thread.join(timeout=5)

    # -- locking helpers -------------------------------------------------------------------------
    def notify(self) -> None:
        self.cond.notify_all()

    def sleep(self, seconds: float) -> None:
        """Sleep with the model lock released (must be called holding it).

        Inside an Async task that a client cancelled (``task.cancel``), raises TASK_CANCELLED."""
        self.check_cancelled()
        if seconds <= 0:
            return
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.stopping.is_set():
                return
            self.cond.wait(left)
            self.check_cancelled()

    def check_cancelled(self) -> None:
        current = getattr(self.local, "task", None)
        if current is None:
            return
        db, task = current
        if db.exists("task", task) and db.get("task", task)["status"] == "cancelling":
            raise errors.failure("TASK_CANCELLED", task)

    def delay(self, message: str) -> None:
        self.sleep(self.latency.delay(message))

    # -- nodes -----------------------------------------------------------------------------------
    def node_by_address(self, address: str) -> Node | None:
        for n in self.nodes.values():
            if n.address == address:
                return n
        return None

    def node_by_uuid(self, uuid: str) -> Node | None:
        for n in self.nodes.values():
            if n.uuid == uuid:
                return n
        return None

    def host_ref(self, db: Database, node: Node) -> str:
        return db.by_uuid("host", node.uuid)

    def node_of_host(self, db: Database, host: str) -> Node:
        node = self.node_by_uuid(db.get("host", host)["uuid"])
        if node is None:
            raise errors.failure("INTERNAL_ERROR", f"no simulated node for host {host}")
        return node

    def slaves_of(self, master: Node) -> Iterator[Node]:
        for n in self.nodes.values():
            if n is not master and n.role == "slave" and n.master_address == master.address:
                yield n

    def master_node_for_db(self, db: Database) -> Node | None:
        for n in self.nodes.values():
            if n.is_master and n.db is db:
                return n
        return None

    def live_pool_dbs(self) -> Iterator[Database]:
        for n in self.nodes.values():
            if n.is_master and n.db is not None:
                yield n.db

    def sync_database(self, master: Node) -> list[str]:
        """Full backup of the master's DB to each live slave (pool_db_backup.ml)."""
        assert master.db is not None
        synced = []
        for slave in self.slaves_of(master):
            if slave.alive:
                slave.replica = master.db.clone()
                slave.replica_time = time.time()
                synced.append(slave.name)
        return synced

    def set_live(self, node: Node, live: bool) -> None:
        for db in self.live_pool_dbs():
            try:
                host = db.by_uuid("host", node.uuid)
            except errors.XenAPIError:
                continue
            metrics = db.get("host", host)["metrics"]
            if db.exists("host_metrics", metrics):
                db.update("host_metrics", metrics, live=live, last_updated=now())
        self.notify()

    def kill_host(self, name: str) -> None:
        with self.lock:
            node = self.nodes[name]
            if not node.alive:
                return
            node.alive = False
            self.set_live(node, False)
        self.on_kill(node)

    def revive_host(self, name: str) -> None:
        with self.lock:
            node = self.nodes[name]
            if node.alive:
                return
            node.alive = True
            if node.is_master:
                assert node.db is not None
                node.db.update("host_metrics", node.db.get("host", self.host_ref(node.db, node))["metrics"],
                               live=True, last_updated=now())
            else:
                master = self.node_by_address(node.master_address)
                if master is not None and master.alive and master.is_master:
                    self.set_live(node, True)
            self.notify()
        self.on_revive(node)

    # -- sessions ---------------------------------------------------------------------------------
    def check_credentials(self, username: str, password: str) -> None:
        if username != self.username or password != self.password:
            delay = self.latency.delay("auth_failure")
            if delay > 0:
                self.sleep(delay)
            raise errors.failure("SESSION_AUTHENTICATION_FAILED", username,
                                 "Authentication failure")

    def login(self, node: Node, username: str, password: str, originator: str = "") -> str:
        if not node.is_master:
            raise errors.failure("HOST_IS_SLAVE", node.master_address)
        self.check_credentials(username, password)
        assert node.db is not None
        db = node.db
        # xapi_session.ml / db_gc_util.ml: at most 500 sessions per originator (and per user name
        # when there is no originator); the oldest ones are destroyed
        key = "originator" if originator else "auth_user_name"
        value = originator or username
        same = [r for r, rec in db.all("session") if rec[key] == value and not rec["pool"]]
        for old in same[: max(0, len(same) - (SESSION_LIMIT - 1))]:
            db.destroy("session", old)
        return db.create(
            "session", this_host=self.host_ref(db, node), last_active=now(),
            validation_time=now(), pool=False, is_local_superuser=True, originator=originator,
            auth_user_name=username, this_user=NULL, subject=NULL, parent=NULL,
        )

    # -- tasks -----------------------------------------------------------------------------------
    def create_task(self, ctx: Ctx, label: str, description: str = "", cancellable: bool = False) -> str:
        host = self.host_ref(ctx.db, ctx.node) if ctx.node.is_master else NULL
        ref = ctx.db.create(
            "task", name_label=label, name_description=description, status="pending",
            created=now(), progress=0.0, resident_on=host,
            allowed_operations=["cancel"] if cancellable else [],
            current_operations={}, subtask_of=NULL, other_config={}, error_info=[], result="",
        )
        self.notify()
        return ref

    def finish_task(self, db: Database, task: str, *, value: Any = None,
                    error: errors.XenAPIError | None = None) -> None:
        if not db.exists("task", task):
            return
        if error is None:
            db.update("task", task, status="success", progress=1.0, finished=now(),
                      allowed_operations=[], result=task_result(value))
        else:
            status = "cancelled" if error.code == "TASK_CANCELLED" else "failure"
            db.update("task", task, status=status, progress=1.0, finished=now(),
                      allowed_operations=[], error_info=error.description)
        self.notify()

    # -- events ----------------------------------------------------------------------------------
    def event_from(self, db: Database, classes: list[str], token: str, timeout: float) -> dict[str, Any]:
        since = self._parse_token(token)
        subs = self._parse_subscriptions(classes)
        deadline = time.monotonic() + max(0.0, min(timeout, 86400.0))
        while True:
            events = self._events_since(db, since, subs)
            left = deadline - time.monotonic()
            if events or left <= 0 or self.stopping.is_set():
                break
            self.cond.wait(left)
        counts = {c.lower(): Int32(len(db.tables[c])) for c in self.dm.classes if c != "event"}
        return {"events": events, "valid_ref_counts": counts, "token": f"{db.gen:020d},{0:020d}"}

    @staticmethod
    def _parse_token(token: str) -> int:
        if token == "":
            return -1
        first, sep, second = token.partition(",")
        try:
            value = int(first)
            if sep:
                int(second)
        except ValueError:
            raise errors.failure("EVENT_FROM_TOKEN_PARSE_FAILURE", token) from None
        return value

    def _parse_subscriptions(self, classes: list[str]) -> list[tuple[str, str | None]]:
        subs: list[tuple[str, str | None]] = []
        for sub in classes:
            if sub == "*":
                subs.append(("*", None))
                continue
            name, sep, ref = sub.partition("/")
            if not name or (sep and not ref) or "/" in ref:
                raise errors.failure("EVENT_SUBSCRIPTION_PARSE_FAILURE", sub)
            cls = self.dm.class_by_lower(name)
            subs.append((cls or f"?{name}", ref or None))
        return subs

    def _matches(self, subs: list[tuple[str, str | None]], cls: str, ref: str) -> bool:
        for scls, sref in subs:
            if scls == "*" or (scls == cls and (sref is None or sref == ref)):
                return True
        return False

    def _events_since(self, db: Database, since: int, subs: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
        out: list[tuple[int, dict[str, Any]]] = []
        for cls, cdef in self.dm.classes.items():
            if not cdef.generates_events:
                continue
            for ref in db.tables[cls]:
                mod = db.modified.get(ref, 0)
                if mod <= since or not self._matches(subs, cls, ref):
                    continue
                op = "add" if db.created.get(ref, 0) > since else "mod"
                out.append((mod, {"id": str(mod), "timestamp": "0.0", "class": cls.lower(),
                                  "operation": op, "ref": ref, "snapshot": db.record(cls, ref)}))
        for gen, cls, ref, created in db.tombstones:
            if gen > since and created <= since and self.dm.classes[cls].generates_events \
                    and self._matches(subs, cls, ref):
                out.append((gen, {"id": str(gen), "timestamp": "0.0", "class": cls.lower(),
                                  "operation": "del", "ref": ref}))
        out.sort(key=lambda e: e[0])
        return [e for _, e in out]

    # -- guests ----------------------------------------------------------------------------------
    def next_domid(self) -> int:
        self._domid += 1
        return self._domid

    def guest_spec(self, db: Database, vm: str, host: str) -> GuestSpec:
        rec = db.get("VM", vm)
        vifs = sorted(db.reverse("VM", "VIFs", vm), key=lambda v: int(db.get("VIF", v)["device"] or 0))
        networks = [db.get("network", db.get("VIF", v)["network"])["name_label"] for v in vifs
                    if db.exists("network", db.get("VIF", v)["network"])]
        return GuestSpec(
            vm_uuid=rec["uuid"], name_label=rec["name_label"],
            host_name=db.get("host", host)["name_label"], memory_bytes=rec["memory_dynamic_max"],
            vcpus=rec["VCPUs_at_startup"], networks=networks,
        )

    def make_ip_reporter(self, vm_uuid: str) -> Callable[[str], None]:
        def report_ip(ip: str) -> None:
            with self.lock:
                for db in self.live_pool_dbs():
                    try:
                        vm = db.by_uuid("VM", vm_uuid)
                    except errors.XenAPIError:
                        continue
                    self.set_guest_ip(db, vm, ip)
                self.notify()
        return report_ip

    def set_guest_ip(self, db: Database, vm: str, ip: str) -> None:
        rec = db.get("VM", vm)
        if rec["power_state"] != "Running":
            return
        networks = {"0/ip": ip, "0/ipv4/0": ip}
        gm = rec["guest_metrics"]
        if gm != NULL and db.exists("VM_guest_metrics", gm):
            merged = dict(db.get("VM_guest_metrics", gm)["networks"], **networks)
            db.update("VM_guest_metrics", gm, networks=merged, last_updated=now(), live=True)
            return
        gm = db.create(
            "VM_guest_metrics",
            os_version={"name": "CentOS Linux release 7.9.2009 (Core)", "uname": "3.10.0-1160.el7.x86_64",
                        "distro": "centos", "major": "7", "minor": "9"},
            PV_drivers_version={"major": "8", "minor": "3", "micro": "0", "build": "1"},
            PV_drivers_up_to_date=True, PV_drivers_detected=True,
            networks=networks, other={"feature-shutdown": "1", "feature-poweroff": "1",
                                      "feature-reboot": "1", "feature-suspend": "1",
                                      "feature-vcpu-hotplug": "1", "has-vendor-device": "0"},
            memory={}, disks={}, live=True, last_updated=now(),
            can_use_hotplug_vbd="yes", can_use_hotplug_vif="yes",
        )
        db.set("VM", vm, "guest_metrics", gm)
        from .api_vm import update_allowed  # the agent's feature flags enable clean operations
        update_allowed(db, vm)

    @contextmanager
    def unlocked(self) -> Iterator[None]:
        """Release the (re-entrant) model lock fully for a blocking backend call."""
        depth = 0
        while True:
            try:
                self.lock.release()
                depth += 1
            except RuntimeError:
                break
        try:
            yield
        finally:
            for _ in range(depth):
                self.lock.acquire()
