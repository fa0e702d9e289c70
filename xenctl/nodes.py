"""scale-nodes: make the node fleet N VMs, from any starting state.

Strategy (desired state, like ``terraform apply`` for one resource with ``count``):

1. **Read** the pool once (pool, hosts, host metrics, VMs, networks, PBDs, tasks) and find the fleet
   by ``other_config`` keys set at clone time: ``xenctl-cloud`` = the cloud's name and
   ``xenctl-index`` = the node's index (1-based). Names are never used to find nodes.
2. **Recover** what a killed run left: ``pool.other_config["xenctl-pending/<cloud>/<i>"]`` is a
   journal entry written before each clone (value: the clone's name) and removed once the clone
   carries its tags; an untagged clone of that name is half-built and destroyed with its disks.
   Tagged nodes still flagged ``is_a_template`` never reached ``VM.provision`` (the last step before
   start): half-built too. Pending clone tasks are waited for first, so an in-flight clone of a
   killed run cannot appear after the sweep.
3. **Plan**: indexes 1..N that lack a built node are created, built nodes above N are removed
   (highest first), halted nodes are started. New and restarted nodes are placed by
   :mod:`xenctl.placement` over the hosts that are live, enabled and see the template's SRs, using
   ``host.compute_free_memory``; a shortfall is reported before anything is changed.
4. **Apply** with bounded concurrency (one session per worker): ``Async.VM.clone``, tag, size
   (``VM.set_memory_limits``, VCPUs in the safe order), VIF on the network, ``VM.provision`` (which
   also clears ``is_a_template``), ``Async.VM.start_on`` the chosen host, and wait for an IP in the
   CIDR from ``VM_guest_metrics.networks``, all waits on ``event.from`` (:mod:`xenctl.events`).
   A node that fails mid-build is destroyed with its disks. Scale-down: clean shutdown, hard
   shutdown after a timeout, ``VDI.destroy`` of its disks, then ``VM.destroy`` (disks first, so a
   kill in between leaves a tagged VM that the next run removes, never an orphan disk).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    Interrupted,
    NotFoundError,
    PlanError,
    SpecError,
    TransientError,
    WaitTimeout,
    XapiConnectionError,
    XapiError,
    XenctlError,
)
from .events import EventWatcher
from .placement import HostCapacity, format_bytes, plan_placement
from .session import Xapi
from .spec import CloudSpec, NodesSpec

__all__ = [
    "JOURNAL_PREFIX",
    "NodeResult",
    "PoolView",
    "Step",
    "format_bytes",
    "read_pool",
    "TAG_CLOUD",
    "TAG_INDEX",
    "FleetNode",
    "ScalePlan",
    "ScaleResult",
    "find_ip",
    "fleet_nodes",
    "node_footprint",
    "plan_scale",
    "scale_nodes",
]

log = logging.getLogger("xenctl")

TAG_CLOUD = "xenctl-cloud"
TAG_INDEX = "xenctl-index"
JOURNAL_PREFIX = "xenctl-pending/"
NULL = "OpaqueRef:NULL"
MiB = 1024**2

Progress = Callable[[str, str], None]  # (node name, what happened)


def _noop(_name: str, _what: str) -> None:
    return None


def node_name(nodes: NodesSpec, index: int) -> str:
    return f"{nodes.name}-{index:02d}"


def node_footprint(memory: int, vcpus: int) -> int:
    """Host memory one node needs: its memory plus xapi's per-VM overhead estimate (shadow
    memory at multiplier 1 plus device model and per-vCPU structures, rounded up to a MiB)."""
    overhead = memory // 128 + vcpus * MiB + 4 * MiB
    return memory + -(-overhead // MiB) * MiB


def find_ip(networks: dict[str, str],
            cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> str | None:
    """The guest's address from ``VM_guest_metrics.networks``: device 0 first (``0/ip``,
    ``0/ipv4/N``, ``0/ipv6/N``), then other devices; inside ``cidr`` when given; never link-local."""
    def order(key: str) -> tuple[int, int, str]:
        dev, _, rest = key.partition("/")
        return (int(dev) if dev.isdigit() else 99, 0 if rest == "ip" else 1, rest)
    for key in sorted(networks, key=order):
        if not re.fullmatch(r"\d+/(ip|ipv4/\d+|ipv6/\d+)", key):
            continue
        try:
            addr = ipaddress.ip_address(str(networks[key]).strip())
        except ValueError:
            continue
        if addr.is_link_local or addr.is_unspecified or addr.is_loopback and cidr is None:
            continue
        if cidr is None:
            if addr.version == 4:
                return str(addr)
            continue
        if addr.version == cidr.version and addr in cidr:
            return str(addr)
    return None


@dataclass
class FleetNode:
    index: int
    ref: str
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.record.get("name_label", ""))

    @property
    def built(self) -> bool:
        return not self.record.get("is_a_template", False)

    @property
    def power_state(self) -> str:
        return str(self.record.get("power_state", ""))


def fleet_nodes(vms: dict[str, dict[str, Any]], cloud: str) -> dict[int, list[FleetNode]]:
    """Fleet VMs by index, found by other_config tags (never by name)."""
    out: dict[int, list[FleetNode]] = {}
    for ref, rec in vms.items():
        oc = rec.get("other_config") or {}
        if oc.get(TAG_CLOUD) != cloud or rec.get("is_a_snapshot") or rec.get("is_control_domain"):
            continue
        try:
            index = int(str(oc.get(TAG_INDEX, "")))
        except ValueError:
            continue
        if index < 1:
            continue
        out.setdefault(index, []).append(FleetNode(index, ref, rec))
    return out


# ------------------------------------------------------------------------------------ plan

@dataclass
class Step:
    action: str  # create | start | wait | remove | cleanup
    index: int
    name: str
    host_ref: str = ""
    host_name: str = ""
    vm_ref: str = ""
    reason: str = ""
    ip: str = ""  # a running node's address, when already known from the read


@dataclass
class ScalePlan:
    cloud: str
    desired: int
    current: int  # built nodes
    steps: list[Step] = field(default_factory=list)
    journal: dict[str, str] = field(default_factory=dict)  # pool.other_config key -> clone name
    footprint: int = 0

    def of(self, action: str) -> list[Step]:
        return [s for s in self.steps if s.action == action]

    @property
    def changes(self) -> bool:
        return bool(self.journal) or any(s.action != "wait" for s in self.steps)

    def describe(self) -> list[str]:
        lines = [f"fleet {self.cloud!r}: {self.current} built node(s), want {self.desired}"]
        for key, name in sorted(self.journal.items()):
            lines.append(f"  recover  {name}  (journal {key} left by an interrupted run)")
        for s in self.steps:
            where = f" on {s.host_name}" if s.host_name else ""
            why = f"  ({s.reason or s.ip})" if s.reason or s.ip else ""
            action = "ok" if s.action == "wait" and s.ip else s.action
            lines.append(f"  {action:<8} {s.name}{where}{why}")
        if not self.changes:
            lines.append("  nothing to do")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "cloud": self.cloud, "desired": self.desired, "current": self.current,
            "footprint_bytes": self.footprint,
            "recover": sorted(self.journal.values()),
            "steps": [{"action": s.action, "node": s.name, "index": s.index,
                       "host": s.host_name, "reason": s.reason} for s in self.steps],
        }


@dataclass
class PoolView:
    """What one read of the pool gives the planner."""

    pool_ref: str
    pool: dict[str, Any]
    hosts: dict[str, dict[str, Any]]
    host_metrics: dict[str, dict[str, Any]]
    vms: dict[str, dict[str, Any]]
    networks: dict[str, dict[str, Any]]
    free_memory: dict[str, int]
    pbds: dict[str, dict[str, Any]] = field(default_factory=dict)
    guest_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def host_name(self, ref: str) -> str:
        return str(self.hosts.get(ref, {}).get("name_label", ref))

    def live(self, ref: str) -> bool:
        metrics = self.hosts.get(ref, {}).get("metrics", NULL)
        return bool(self.host_metrics.get(metrics, {}).get("live", False))


def read_pool(xapi: Xapi, *, with_free_memory: bool = True) -> PoolView:
    pools = xapi.call("pool.get_all_records")
    if not pools:
        raise XapiError("INTERNAL", [], message="the server has no pool object")
    pool_ref, pool = next(iter(pools.items()))
    hosts = xapi.call("host.get_all_records")
    metrics = xapi.call("host_metrics.get_all_records")
    vms = xapi.call("VM.get_all_records")
    networks = xapi.call("network.get_all_records")
    guest_metrics = xapi.call("VM_guest_metrics.get_all_records")
    free: dict[str, int] = {}
    if with_free_memory:
        for ref in hosts:
            free[ref] = int(xapi.call("host.compute_free_memory", ref))
    return PoolView(pool_ref, pool, hosts, metrics, vms, networks, free,
                    guest_metrics=guest_metrics)


def _find_template(view: PoolView, name: str) -> tuple[str, dict[str, Any]]:
    if not name:
        raise SpecError("nodes.template: missing; name the template the nodes are cloned from")
    by_uuid = [(r, v) for r, v in view.vms.items() if v.get("uuid") == name]
    found = by_uuid or [(r, v) for r, v in view.vms.items()
                        if v.get("name_label") == name and v.get("is_a_template")
                        and not v.get("is_a_snapshot")]
    if not found:
        raise SpecError(f"nodes.template: no template named {name!r} in the pool "
                        "(give its exact name_label or uuid)")
    if len(found) > 1:
        raise SpecError(f"nodes.template: {len(found)} templates are named {name!r}; give the uuid "
                        f"(one of {', '.join(str(v.get('uuid')) for _, v in found)})")
    ref, rec = found[0]
    if not rec.get("is_a_template"):
        raise SpecError(f"nodes.template: {name!r} is a VM, not a template")
    return ref, rec


def _find_network(view: PoolView, name: str, template: dict[str, Any] | None) -> str:
    if not name:
        return ""
    found = [r for r, n in view.networks.items() if name in (n.get("uuid"), n.get("name_label"),
                                                              n.get("bridge"))]
    if not found:
        raise SpecError(f"nodes.network: no network named {name!r} (name_label, bridge or uuid)")
    if len(found) > 1:
        raise SpecError(f"nodes.network: {name!r} matches {len(found)} networks; give the uuid")
    return found[0]


def plan_scale(view: PoolView, spec: CloudSpec, desired: int, *,
               template_srs: set[str] | None = None) -> ScalePlan:
    """Pure planning over one read of the pool (raises PlanError on a memory shortfall)."""
    nodes = spec.nodes
    fleet = fleet_nodes(view.vms, spec.cloud)
    journal = {k: str(v) for k, v in (view.pool.get("other_config") or {}).items()
               if k.startswith(f"{JOURNAL_PREFIX}{spec.cloud}/")}
    plan = ScalePlan(spec.cloud, desired, 0, journal=journal,
                     footprint=node_footprint(nodes.memory, nodes.vcpus))
    keep: dict[int, FleetNode] = {}
    for index, members in sorted(fleet.items()):
        built = [m for m in members if m.built]
        # prefer a running node when an index is duplicated (e.g. tags copied by hand)
        built.sort(key=lambda m: (m.power_state != "Running", m.ref))
        for m in members:
            if not m.built:
                plan.steps.append(Step("cleanup", index, m.name or node_name(nodes, index),
                                       vm_ref=m.ref, reason="half-built by an interrupted run"))
        if built:
            keep[index] = built[0]
            for extra in built[1:]:
                plan.steps.append(Step("remove", index, extra.name, vm_ref=extra.ref,
                                       reason=f"duplicate of index {index}"))
    plan.current = len(keep)
    # scale-down: highest indexes first
    for index in sorted((i for i in keep if i > desired), reverse=True):
        n = keep[index]
        plan.steps.append(Step("remove", index, n.name, vm_ref=n.ref,
                               host_ref=str(n.record.get("resident_on", NULL)),
                               host_name=view.host_name(str(n.record.get("resident_on", NULL)))
                               if n.record.get("resident_on", NULL) != NULL else ""))
    to_start = [keep[i] for i in sorted(keep) if i <= desired
                and keep[i].power_state in ("Halted", "Suspended")]
    to_create = [i for i in range(1, desired + 1) if i not in keep]
    # running nodes without an IP yet are waited for (no change)
    for i in sorted(keep):
        if i <= desired and keep[i].power_state in ("Running", "Paused"):
            gm = view.guest_metrics.get(str(keep[i].record.get("guest_metrics", NULL)), {})
            plan.steps.append(Step("wait", i, keep[i].name, vm_ref=keep[i].ref,
                                   host_ref=str(keep[i].record.get("resident_on", NULL)),
                                   host_name=view.host_name(str(keep[i].record.get("resident_on"))),
                                   ip=find_ip(dict(gm.get("networks") or {}), nodes.cidr) or ""))
    placements = len(to_start) + len(to_create)
    if placements:
        counts: dict[str, int] = {}
        removing = {s.vm_ref for s in plan.steps if s.action in ("remove", "cleanup")}
        freed: dict[str, int] = {}
        for i, n in keep.items():
            host = str(n.record.get("resident_on", NULL))
            if n.power_state == "Running" and host != NULL:
                if n.ref in removing or i > desired:
                    freed[host] = freed.get(host, 0) + plan.footprint
                else:
                    counts[host] = counts.get(host, 0) + 1
        candidates: list[HostCapacity] = []
        for ref, hrec in view.hosts.items():
            if template_srs is not None and not _host_sees(view, ref, template_srs):
                continue
            candidates.append(HostCapacity(
                ref=ref, name=str(hrec.get("name_label", ref)),
                free_memory=view.free_memory.get(ref, 0) + freed.get(ref, 0),
                live=view.live(ref), enabled=bool(hrec.get("enabled", False)),
                fleet_nodes=counts.get(ref, 0)))
        if not candidates:
            raise PlanError("no host can run the nodes: none sees the template's storage",
                            hint="put the template's disks on a shared SR")
        chosen = plan_placement(candidates, placements, plan.footprint, nodes.placement)
        it = iter(chosen)
        for n in to_start:
            h = next(it)
            plan.steps.append(Step("start", n.index, n.name, vm_ref=n.ref, host_ref=h.ref,
                                   host_name=h.name, reason=f"was {n.power_state.lower()}"))
        for i in to_create:
            h = next(it)
            plan.steps.append(Step("create", i, node_name(nodes, i), host_ref=h.ref,
                                   host_name=h.name))
    order = {"cleanup": 0, "remove": 1, "start": 2, "create": 3, "wait": 4}
    plan.steps.sort(key=lambda s: (order[s.action], -s.index if s.action == "remove" else s.index))
    return plan


def _host_sees(view: PoolView, host: str, srs: set[str]) -> bool:
    attached = {str(p.get("SR")) for p in view.pbds.values()
                if p.get("host") == host and p.get("currently_attached")}
    return srs <= attached


# ------------------------------------------------------------------------------------ apply

@dataclass
class NodeResult:
    index: int
    name: str
    vm: str = ""
    host: str = ""
    ip: str = ""
    action: str = ""
    error: str = ""


@dataclass
class ScaleResult:
    plan: ScalePlan
    changed: bool = False
    nodes: list[NodeResult] = field(default_factory=list)
    failures: list[NodeResult] = field(default_factory=list)
    calls: int = 0
    call_counts: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    watcher: EventWatcher | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "changed": self.changed, "elapsed_s": round(self.elapsed, 3), "calls": self.calls,
            "plan": self.plan.to_json(),
            "nodes": [vars(n) for n in self.nodes],
            "failures": [vars(n) for n in self.failures],
        }


class _SessionPool:
    """Sessions for worker threads, created on demand (a fork of the main session each)."""

    def __init__(self, main: Xapi, size: int) -> None:
        self.main = main
        self.size = size
        self.free: queue.SimpleQueue[Xapi] = queue.SimpleQueue()
        self.all: list[Xapi] = []
        self.lock = threading.Lock()

    @contextmanager
    def borrow(self) -> Iterator[Xapi]:
        try:
            x = self.free.get_nowait()
        except queue.Empty:
            x = self.main.fork()
            with self.lock:
                self.all.append(x)
        try:
            yield x
        finally:
            self.free.put(x)

    def close(self) -> None:
        for x in self.all:
            x.logout()


class _Runner:
    def __init__(self, main: Xapi, spec: CloudSpec, view: PoolView, plan: ScalePlan,
                 watcher: EventWatcher, progress: Progress, *, template_ref: str,
                 template: dict[str, Any], network_ref: str, task_timeout: float) -> None:
        self.main = main
        self.spec = spec
        self.nodes = spec.nodes
        self.view = view
        self.plan = plan
        self.watcher = watcher
        self.progress = progress
        self.template_ref = template_ref
        self.template = template
        self.network_ref = network_ref
        self.task_timeout = task_timeout
        self.sessions = _SessionPool(main, max(1, self.nodes.concurrency))
        self.template_vifs_wrong = False
        self.provision_sr_uuid = ""  # resolved once, before the workers start
        self.unsettled: set[int] = set()  # indexes whose clone outcome is unknown (journal kept)

    # ------------------------------------------------------------------ helpers
    def run_task(self, x: Xapi, method: str, *args: Any, what: str,
                 timeout: float | None = None) -> str:
        task = x.call(method, *args)
        try:
            return self.watcher.wait_task(task, timeout or self.task_timeout, what)
        finally:
            with suppress(XenctlError):
                x.call("task.destroy", task)

    def vm_record(self, vm: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.watcher.wait_object("vm", vm, timeout)

    def wait_ip(self, vm: str, name: str) -> str:
        cidr = self.nodes.cidr

        def ip() -> str | None:
            rec = self.watcher.objects.get("vm", {}).get(vm)
            if rec is None:
                return None
            gm = rec.get("guest_metrics", NULL)
            if gm in (NULL, "", None):
                return None
            metrics = self.watcher.objects.get("vm_guest_metrics", {}).get(gm)
            if metrics is None:
                return None
            return find_ip(dict(metrics.get("networks") or {}), cidr)

        where = f" in {cidr}" if cidr else ""
        return self.watcher.wait_for(ip, self.nodes.ip_timeout, f"{name} to report an IP{where} "
                                     "(is the guest agent installed and the network's DHCP up?)")

    def destroy_vm(self, x: Xapi, vm: str, name: str, *, clean: bool) -> None:
        """Shut down (clean, then hard after the timeout), destroy the disks, then the VM."""
        try:
            rec = x.call("VM.get_record", vm)
        except NotFoundError:
            return
        state = rec.get("power_state")
        if state == "Running" and clean and self.nodes.shutdown_timeout > 0:
            self.progress(name, "shutting down")
            try:
                self.run_task(x, "Async.VM.clean_shutdown", vm, what=f"clean shutdown of {name}",
                              timeout=self.nodes.shutdown_timeout)
                state = "Halted"
            except (WaitTimeout, XapiError) as exc:
                log.info("%s: clean shutdown failed (%s); hard shutdown", name, exc)
                state = str(x.call("VM.get_power_state", vm))
        if state in ("Running", "Paused", "Suspended"):
            if state == "Running" or state == "Paused":
                self.progress(name, "hard shutdown")
            self.run_task(x, "Async.VM.hard_shutdown", vm, what=f"hard shutdown of {name}")
        for vbd in rec.get("VBDs", []):
            try:
                vbd_rec = x.call("VBD.get_record", vbd)
            except NotFoundError:
                continue
            vdi = vbd_rec.get("VDI", NULL)
            if vbd_rec.get("type") != "Disk" or vdi in (NULL, "") or vbd_rec.get("empty"):
                continue
            try:
                vdi_vbds = x.call("VDI.get_VBDs", vdi)
            except NotFoundError:
                continue
            if len(vdi_vbds) > 1:
                log.warning("%s: disk %s is shared with another VM; kept", name, vdi)
                continue
            with suppress(NotFoundError):
                x.call("VDI.destroy", vdi)
        with suppress(NotFoundError):
            x.call("VM.destroy", vm)

    # ------------------------------------------------------------------ steps
    def create(self, step: Step) -> NodeResult:
        res = NodeResult(step.index, step.name, host=step.host_name, action="create")
        attempts = 2
        for attempt in range(attempts):
            with self.sessions.borrow() as x:
                try:
                    self._build(x, step, res)
                    return res
                except (TransientError, XapiConnectionError) as exc:
                    if attempt + 1 >= attempts or step.index in self.unsettled:
                        raise
                    self.progress(step.name, f"retrying after {exc}")
        return res

    def _build(self, x: Xapi, step: Step, res: NodeResult) -> None:
        pool_ref = self.view.pool_ref
        key = f"{JOURNAL_PREFIX}{self.spec.cloud}/{step.index}"
        name = step.name
        try:
            x.call("pool.add_to_other_config", pool_ref, key, name)
        except XapiError as exc:  # a stale entry (recovered already): replace it
            if exc.code != "MAP_DUPLICATE_KEY":
                raise
            x.call("pool.remove_from_other_config", pool_ref, key)
            x.call("pool.add_to_other_config", pool_ref, key, name)
        vm = ""
        journal = True
        clone_unknown = False  # a clone was asked for and its outcome is not known
        try:
            self.check_aborted()
            self.progress(name, "cloning")
            clone_unknown = True
            vm = self.run_task(x, "Async.VM.clone", self.template_ref, name,
                               what=f"clone of {name}")
            clone_unknown = False
            if not vm.startswith("OpaqueRef:"):
                raise XapiError("INTERNAL", [vm], message=f"clone of {name} returned {vm!r}")
            res.vm = vm
            rec = self.vm_record(vm)
            other = dict(rec.get("other_config") or {})
            other[TAG_CLOUD] = self.spec.cloud
            other[TAG_INDEX] = str(step.index)
            if "disks" in other:
                other["disks"] = self._provision_sr(other["disks"])
            x.call("VM.set_other_config", vm, other)
            x.call("pool.remove_from_other_config", pool_ref, key)
            journal = False
            self._size(x, vm, rec)
            self._vif(x, vm, rec)
            x.call("VM.provision", vm)
            self.check_aborted()
            self.progress(name, f"starting on {step.host_name}")
            self.run_task(x, "Async.VM.start_on", vm, step.host_ref, False, False,
                          what=f"start of {name}")
            self.progress(name, "waiting for IP")
            res.ip = self.wait_ip(vm, name)
            self.progress(name, f"up at {res.ip}")
        except BaseException as exc:
            if isinstance(exc, XapiError):
                clone_unknown = False  # the clone task failed (or was never created)
            if self.watcher.aborted is not None or not isinstance(exc, Exception):
                # interrupted: stop at once; the next run finds what is left (tags, journal)
                self.progress(name, "interrupted; the next run finishes or removes it")
                res.vm = ""
                raise
            self.progress(name, f"failed: {exc}; removing the half-built VM")
            with suppress(XenctlError):
                if clone_unknown and isinstance(exc, XapiConnectionError):
                    # the connection dropped around Async.VM.clone: a clone may exist untagged
                    self._sweep_clone(x, name)
                    clone_unknown = False
                if vm:
                    self.destroy_vm(x, vm, name, clean=False)
                if journal and not clone_unknown:
                    x.call("pool.remove_from_other_config", pool_ref, key)
                elif journal:
                    self.unsettled.add(step.index)
                    self.progress(name, "a clone may still be in flight; the next run removes it")
            res.vm = ""
            raise

    def check_aborted(self) -> None:
        if self.watcher.aborted is not None:
            raise Interrupted(self.watcher.aborted)

    def _sweep_clone(self, x: Xapi, name: str) -> None:
        """Wait for the clone tasks pending now, then destroy any untagged clone named ``name``."""
        with self.watcher.cond:
            pending = {r for r, t in self.watcher.objects.get("task", {}).items()
                       if t.get("name_label") == "Async.VM.clone"
                       and t.get("status") in ("pending", "cancelling")}

        def settled() -> bool | None:
            tasks = self.watcher.objects.get("task", {})
            busy = [r for r in pending
                    if tasks.get(r, {}).get("status") in ("pending", "cancelling")]
            return None if busy else True
        self.watcher.wait_for(settled, self.task_timeout, f"clone tasks to settle ({name})")
        for ref in _stray_clones(self.watcher, self.spec, name):
            self.progress(name, "removing a clone whose request lost its connection")
            self.destroy_vm(x, ref, name, clean=False)

    def _provision_sr(self, disks: str) -> str:
        """xe vm-install rewrites an empty ``sr`` in the provision spec to the default SR uuid;
        an API client must do the same (else UUID_INVALID)."""
        if not self.provision_sr_uuid:
            return disks
        return disks.replace('sr=""', f'sr="{self.provision_sr_uuid}"')

    def _size(self, x: Xapi, vm: str, rec: dict[str, Any]) -> None:
        mem = self.nodes.memory
        smin = min(int(rec.get("memory_static_min", mem)), mem)
        current = (int(rec.get("memory_static_min", 0)), int(rec.get("memory_static_max", 0)),
                   int(rec.get("memory_dynamic_min", 0)), int(rec.get("memory_dynamic_max", 0)))
        if current != (smin, mem, mem, mem):
            x.call("VM.set_memory_limits", vm, str(smin), str(mem), str(mem), str(mem))
        want = self.nodes.vcpus
        vmax = int(rec.get("VCPUs_max", want))
        vstart = int(rec.get("VCPUs_at_startup", want))
        if (vmax, vstart) != (want, want):
            if want > vmax:  # raise the ceiling first
                x.call("VM.set_VCPUs_max", vm, str(want))
                x.call("VM.set_VCPUs_at_startup", vm, str(want))
            else:  # lower the start count first
                if vstart != want:
                    x.call("VM.set_VCPUs_at_startup", vm, str(want))
                if vmax != want:
                    x.call("VM.set_VCPUs_max", vm, str(want))

    def _vif(self, x: Xapi, vm: str, rec: dict[str, Any]) -> None:
        """Make sure device 0 is on the spec's network (clones copy the template's VIFs)."""
        if not self.network_ref:
            return
        vifs = list(rec.get("VIFs") or [])
        if vifs and not self.template_vifs_wrong:
            return
        for vif in vifs:
            vrec = x.call("VIF.get_record", vif)
            if vrec.get("device") == "0":
                if vrec.get("network") == self.network_ref:
                    return
                x.call("VIF.destroy", vif)
        x.call("VIF.create", {
            "device": "0", "network": self.network_ref, "VM": vm, "MAC": "",
            "MTU": str(self.view.networks.get(self.network_ref, {}).get("MTU", "1500")),
            "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {},
        })

    def start(self, step: Step) -> NodeResult:
        res = NodeResult(step.index, step.name, vm=step.vm_ref, host=step.host_name,
                         action="start")
        self.check_aborted()
        with self.sessions.borrow() as x:
            self.progress(step.name, f"starting on {step.host_name}")
            state = self.watcher.get("vm", step.vm_ref) or {}
            if state.get("power_state") == "Suspended":
                self.run_task(x, "Async.VM.resume_on", step.vm_ref, step.host_ref, False, False,
                              what=f"resume of {step.name}")
            else:
                self.run_task(x, "Async.VM.start_on", step.vm_ref, step.host_ref, False, False,
                              what=f"start of {step.name}")
        res.ip = self.wait_ip(step.vm_ref, step.name)
        self.progress(step.name, f"up at {res.ip}")
        return res

    def wait(self, step: Step) -> NodeResult:
        res = NodeResult(step.index, step.name, vm=step.vm_ref, host=step.host_name, action="")
        res.ip = step.ip or self.wait_ip(step.vm_ref, step.name)
        return res

    def remove(self, step: Step) -> NodeResult:
        res = NodeResult(step.index, step.name, vm=step.vm_ref, host=step.host_name,
                         action=step.action)
        self.check_aborted()
        with self.sessions.borrow() as x:
            self.progress(step.name, "removing" if step.action == "remove" else
                          "removing half-built VM")
            self.destroy_vm(x, step.vm_ref, step.name, clean=step.action == "remove")
        self.progress(step.name, "removed")
        return res


def _stray_clones(watcher: EventWatcher, spec: CloudSpec, name: str) -> list[str]:
    """Untagged clones named ``name``: what a clone asked for before tagging leaves behind (a clone
    of a template is still a template until VM.provision; never the template itself)."""
    with watcher.cond:
        vms = dict(watcher.objects.get("vm", {}))
    return [ref for ref, rec in sorted(vms.items())
            if rec.get("name_label") == name and TAG_CLOUD not in (rec.get("other_config") or {})
            and rec.get("is_a_template") and not rec.get("is_default_template")
            and spec.nodes.template not in (rec.get("name_label"), rec.get("uuid"))]


def _recover(x: Xapi, watcher: EventWatcher, view: PoolView, spec: CloudSpec,
             destroy: Callable[[Xapi, str, str], None], progress: Progress,
             timeout: float) -> bool:
    """Let what a killed run left in flight finish, then destroy the untagged clones its journal
    names and drop the entries. Returns True when something was changed."""
    fleet_refs = {n.ref for ns in fleet_nodes(view.vms, spec.cloud).values() for n in ns}
    journal = {k: str(v) for k, v in (view.pool.get("other_config") or {}).items()
               if k.startswith(f"{JOURNAL_PREFIX}{spec.cloud}/")}

    def quiet() -> bool | None:
        vms = watcher.objects.get("vm", {})
        if any(vms.get(r, {}).get("current_operations") for r in fleet_refs):
            return None
        if journal and any(t.get("name_label") == "Async.VM.clone"
                           and t.get("status") in ("pending", "cancelling")
                           for t in watcher.objects.get("task", {}).values()):
            return None  # an interrupted run's clone may still be in flight
        return True

    watcher.wait_for(quiet, timeout, "operations left by an interrupted run to finish")
    if not journal:
        return False
    for key, name in sorted(journal.items()):
        for ref in _stray_clones(watcher, spec, name):
            progress(name, "removing a clone left by an interrupted run")
            destroy(x, ref, name)
        with suppress(XapiError):
            x.call("pool.remove_from_other_config", view.pool_ref, key)
    return True


def _needs_recovery(view: PoolView, spec: CloudSpec) -> bool:
    if any(k.startswith(f"{JOURNAL_PREFIX}{spec.cloud}/") for k in view.pool.get("other_config") or {}):
        return True
    return any(n.record.get("current_operations")
               for ns in fleet_nodes(view.vms, spec.cloud).values() for n in ns)


def scale_nodes(xapi: Xapi, spec: CloudSpec, desired: int, *, dry_run: bool = False,
                progress: Progress = _noop, task_timeout: float = 600.0,
                plan_hook: Callable[[ScalePlan], None] | None = None) -> ScaleResult:
    """Converge the fleet to ``desired`` nodes (see the module docstring)."""
    started = time.monotonic()
    calls_before = xapi.stats.total
    counts_before = xapi.stats.snapshot()
    if desired < 0:
        raise SpecError("count must be >= 0")
    view = read_pool(xapi)
    watcher: EventWatcher | None = None
    sessions = _SessionPool(xapi, max(1, spec.nodes.concurrency))
    recovered = False

    def start_watcher() -> EventWatcher:
        return EventWatcher(xapi.fork(), ["vm", "vm_guest_metrics", "task"],
                            poll_timeout=10.0).start()

    try:
        if not dry_run and _needs_recovery(view, spec):
            watcher = start_watcher()
            helper = _Runner(xapi, spec, view, ScalePlan(spec.cloud, desired, 0), watcher,
                             progress, template_ref="", template={}, network_ref="",
                             task_timeout=task_timeout)
            helper.sessions = sessions
            with sessions.borrow() as x:
                recovered = _recover(
                    x, watcher, view, spec,
                    lambda xx, ref, name: helper.destroy_vm(xx, ref, name, clean=False),
                    progress, task_timeout)
            view = read_pool(xapi)  # plan on the state after the interrupted run settled
        result = _plan_and_apply(xapi, spec, desired, view, dry_run=dry_run, progress=progress,
                                 task_timeout=task_timeout, plan_hook=plan_hook,
                                 sessions=sessions, watcher=watcher, start_watcher=start_watcher)
        result.changed = result.changed or recovered
        watcher = result.watcher or watcher
    finally:
        sessions.close()
        if watcher is not None:
            w = watcher
            wake_ref = next(iter(w.objects.get("vm", {})), "")

            def wake() -> None:
                if wake_ref:
                    xapi.call("event.inject", "VM", wake_ref)
            w.stop(wake)
    result.nodes.sort(key=lambda n: n.index)
    result.elapsed = time.monotonic() - started
    result.calls = xapi.stats.total - calls_before
    after = xapi.stats.snapshot()
    result.call_counts = {k: after.get(k, 0) - counts_before.get(k, 0) for k in after
                          if after.get(k, 0) - counts_before.get(k, 0)}
    return result


def _plan_and_apply(xapi: Xapi, spec: CloudSpec, desired: int, view: PoolView, *, dry_run: bool,
                    progress: Progress, task_timeout: float,
                    plan_hook: Callable[[ScalePlan], None] | None, sessions: _SessionPool,
                    watcher: EventWatcher | None,
                    start_watcher: Callable[[], EventWatcher]) -> ScaleResult:
    fleet = fleet_nodes(view.vms, spec.cloud)
    need_template = desired > 0 and any(
        i not in fleet or not any(n.built for n in fleet[i]) for i in range(1, desired + 1))
    template_ref = ""
    template: dict[str, Any] = {}
    template_srs: set[str] | None = None
    network_ref = ""
    template_vifs_wrong = False
    if need_template:
        template_ref, template = _find_template(view, spec.nodes.template)
        network_ref = _find_network(view, spec.nodes.network, template)
        template_srs = set()
        for vbd in template.get("VBDs", []):
            vbd_rec = xapi.call("VBD.get_record", vbd)
            if vbd_rec.get("type") == "Disk" and vbd_rec.get("VDI") not in (NULL, ""):
                template_srs.add(str(xapi.call("VDI.get_SR", vbd_rec["VDI"])))
        if template_srs:
            view.pbds = xapi.call("PBD.get_all_records")
        for vif in template.get("VIFs", []):
            vrec = xapi.call("VIF.get_record", vif)
            if network_ref and vrec.get("network") != network_ref:
                template_vifs_wrong = True
    plan = plan_scale(view, spec, desired, template_srs=template_srs or None)
    if plan_hook is not None:
        plan_hook(plan)
    result = ScaleResult(plan)
    if dry_run:
        return result
    if all(st.action == "wait" and st.ip for st in plan.steps):
        # nothing to change or wait for: no event loop, no write of any kind
        result.nodes = [NodeResult(st.index, st.name, vm=st.vm_ref, host=st.host_name, ip=st.ip)
                        for st in plan.steps]
        return result
    if watcher is None:
        watcher = start_watcher()
    result.watcher = watcher
    runner = _Runner(xapi, spec, view, plan, watcher, progress, template_ref=template_ref,
                     template=template, network_ref=network_ref, task_timeout=task_timeout)
    runner.sessions = sessions
    runner.template_vifs_wrong = template_vifs_wrong
    if 'sr=""' in str((template.get("other_config") or {}).get("disks", "")):
        sr = spec.nodes.sr
        if sr and not re.fullmatch(r"[0-9a-f-]{36}", sr):
            found = [r for r in xapi.call("SR.get_by_name_label", sr)]
            if len(found) != 1:
                raise SpecError(f"nodes.sr: {len(found)} SRs are named {sr!r}; give the uuid")
            sr = str(xapi.call("SR.get_uuid", found[0]))
        if not sr and view.pool.get("default_SR", NULL) not in (NULL, ""):
            sr = str(xapi.call("SR.get_uuid", view.pool["default_SR"]))
        runner.provision_sr_uuid = sr
    workers = max(1, spec.nodes.concurrency)
    work: dict[str, Callable[[Step], NodeResult]] = {
        "cleanup": runner.remove, "remove": runner.remove, "start": runner.start,
        "create": runner.create, "wait": runner.wait}
    # removals first: they free the memory the placement counted on
    phases = [[s for s in plan.steps if s.action in ("cleanup", "remove")],
              [s for s in plan.steps if s.action in ("start", "create", "wait")]]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xenctl-node") as ex:
        futures: dict[Future[NodeResult], Step] = {}
        try:
            for phase in phases:
                futures = {ex.submit(work[s.action], s): s for s in phase}
                for fut in as_completed(futures):
                    s = futures[fut]
                    if s.action != "wait":
                        result.changed = True
                    try:
                        r = fut.result()
                    except XenctlError as exc:
                        result.failures.append(NodeResult(s.index, s.name, host=s.host_name,
                                                          action=s.action, error=str(exc)))
                        progress(s.name, f"FAILED: {exc}")
                        continue
                    if s.action not in ("remove", "cleanup"):
                        result.nodes.append(r)
        except BaseException:
            # Ctrl-C / SIGTERM (or a bug): start nothing new, wake every waiting worker so the
            # pool shuts down at once; what is in flight is left for the next run to converge
            watcher.abort("interrupted")
            for fut in futures:
                fut.cancel()
            raise
    return result
