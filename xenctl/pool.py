"""Pool operations: create (name + pool.join), status, failover (planned and emergency), eject.

Strategy: XenAPI has no ``pool.create``. A pool is formed by naming the pool object on the host
that will be master and having every other (standalone) host call ``pool.join`` on itself with the
master's address; the joining xapi then restarts as a slave. xenctl waits, with ``event.from`` on
the master, until every host is live and enabled, forces a database backup to the members
(``pool.sync_database``) and checks, with a local login on each member
(``session.slave_local_login_with_password``), that the member's replica holds the pool. Every
step is checked before it is taken, so a re-run on a formed pool changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import PoolError, WaitTimeout, XapiConnectionError, XapiError, XenctlError
from .events import EventWatcher
from .nodes import NULL, TAG_CLOUD, TAG_INDEX
from .placement import format_bytes
from .session import CallStats, RetryPolicy, Xapi, replace_host
from .spec import PoolSpec, Secret, url_host

__all__ = [
    "HostStatus",
    "PoolResult",
    "PoolStatus",
    "find_host",
    "pool_create",
    "pool_eject",
    "pool_failover",
    "pool_status",
]

log = logging.getLogger("xenctl")
Progress = Callable[[str], None]


def _noop(_msg: str) -> None:
    return None


@dataclass
class PoolResult:
    changed: bool = False
    actions: list[str] = field(default_factory=list)
    master: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HostStatus:
    name: str
    uuid: str
    address: str
    role: str
    live: bool
    enabled: bool
    api_version: str
    memory_total: int
    memory_free: int
    nodes: list[str] = field(default_factory=list)


@dataclass
class PoolStatus:
    name: str
    uuid: str
    master: str
    hosts: list[HostStatus]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> list[str]:
        lines = [f"pool {self.name or '(unnamed)'}  uuid {self.uuid}  master {self.master}"]
        width = max([len(h.name) for h in self.hosts] + [4])
        lines.append(f"  {'HOST':<{width}}  ROLE    LIVE  ENABLED  API   MEMORY FREE / TOTAL     NODES")
        for h in self.hosts:
            mem = f"{format_bytes(h.memory_free)} / {format_bytes(h.memory_total)}"
            lines.append(
                f"  {h.name:<{width}}  {h.role:<6}  {'yes' if h.live else 'NO':<4}  "
                f"{'yes' if h.enabled else 'no':<7}  {h.api_version:<4}  {mem:<22}  "
                f"{len(h.nodes)}" + (f" ({', '.join(h.nodes)})" if h.nodes else ""))
        return lines


def find_host(hosts: dict[str, dict[str, Any]], wanted: str) -> str:
    """A host ref by name_label, hostname, address, uuid or URL."""
    key = url_host(wanted) if "://" in wanted else wanted
    found = [r for r, h in hosts.items()
             if key in (h.get("name_label"), h.get("hostname"), h.get("address"), h.get("uuid"))]
    if not found:
        names = ", ".join(sorted(str(h.get("name_label")) for h in hosts.values()))
        raise PoolError("HOST_NOT_FOUND", [wanted], message=f"no host {wanted!r} in the pool",
                        hint=f"hosts are: {names}")
    if len(found) > 1:
        raise PoolError("HOST_AMBIGUOUS", [wanted], message=f"{wanted!r} matches several hosts",
                        hint="use the uuid")
    return found[0]


def pool_status(xapi: Xapi, cloud: str = "") -> PoolStatus:
    pools = xapi.call("pool.get_all_records")
    pool_ref, pool = next(iter(pools.items()))
    hosts = xapi.call("host.get_all_records")
    metrics = xapi.call("host_metrics.get_all_records")
    vms = xapi.call("VM.get_all_records")
    nodes: dict[str, list[tuple[int, str]]] = {}
    for rec in vms.values():
        oc = rec.get("other_config") or {}
        if cloud and oc.get(TAG_CLOUD) != cloud:
            continue
        if not cloud and TAG_CLOUD not in oc:
            continue
        if rec.get("power_state") == "Running" and rec.get("resident_on", NULL) != NULL:
            try:
                idx = int(str(oc.get(TAG_INDEX, "0")))
            except ValueError:
                idx = 0
            nodes.setdefault(str(rec["resident_on"]), []).append((idx, str(rec.get("name_label"))))
    out = []
    for ref, h in hosts.items():
        m = metrics.get(h.get("metrics", NULL), {})
        live = bool(m.get("live", False))
        free = int(xapi.call("host.compute_free_memory", ref)) if live else 0
        out.append(HostStatus(
            name=str(h.get("name_label")), uuid=str(h.get("uuid")), address=str(h.get("address")),
            role="master" if ref == pool.get("master") else "member", live=live,
            enabled=bool(h.get("enabled")),
            api_version=f"{h.get('API_version_major')}.{h.get('API_version_minor')}",
            memory_total=int(m.get("memory_total", 0)), memory_free=free,
            nodes=[n for _, n in sorted(nodes.get(ref, []))]))
    out.sort(key=lambda s: (s.role != "master", s.name))
    master = hosts.get(pool.get("master"), {}).get("name_label", "?")
    _ = pool_ref
    return PoolStatus(str(pool.get("name_label", "")), str(pool.get("uuid", "")), str(master), out)


def _probe(spec: PoolSpec, password: Secret, url: str, stats: CallStats | None, *,
           local: bool = False, timeout: float = 30.0) -> Xapi:
    """A login to exactly ``url`` (HOST_IS_SLAVE is not followed) with no reset retries."""
    x = Xapi(url, spec.username, password, spec.tls, stats=stats, timeout=timeout, local=local,
             retry=RetryPolicy(reset_attempts=0), follow=False)
    return x.login()


def _host_keys(h: dict[str, Any]) -> set[str]:
    return {str(h.get(k)) for k in ("address", "hostname", "name_label") if h.get(k)}


def pool_create(spec: PoolSpec, password: Secret, *, dry_run: bool = False,
                progress: Progress = _noop, stats: CallStats | None = None,
                join_timeout: float = 300.0) -> PoolResult:
    """Form the pool of ``spec.master`` + ``spec.members`` (idempotent)."""
    result = PoolResult()
    master = Xapi(spec.master, spec.username, password, spec.tls, stats=stats).login()
    try:
        if master.redirects:
            progress(f"{url_host(spec.master)} is a member; the pool's master is {master.host}")
        pools = master.call("pool.get_all_records")
        pool_ref, pool = next(iter(pools.items()))
        hosts = master.call("host.get_all_records")
        master_host = hosts[pool["master"]]
        result.master = str(master_host.get("name_label"))
        if pool.get("name_label") != spec.name:
            result.actions.append(f"name the pool {spec.name!r} on {result.master}")
            if not dry_run:
                master.call("pool.set_name_label", pool_ref, spec.name)
        in_pool: set[str] = set()
        for h in hosts.values():
            in_pool |= _host_keys(h)
        joins: list[str] = []
        for member in spec.all_hosts:
            if url_host(member) in in_pool:
                continue
            if member == spec.master and master.redirects:
                raise PoolError("HOST_NOT_IN_POOL", [member],
                                message=f"{url_host(member)} is not a host of the pool mastered by "
                                        f"{master.host}")
            joins.append(member)
        for member in joins:
            _join(spec, password, member, master_host, result, dry_run=dry_run,
                  progress=progress, stats=stats)
        if dry_run:
            result.changed = bool(result.actions)
            return result
        if joins:
            _wait_hosts_up(master, len(spec.all_hosts), join_timeout, progress)
            progress("syncing the pool database to the members")
            master.call("pool.sync_database")
        _check_replicas(spec, password, master, str(pool.get("uuid")), synced=bool(joins),
                        progress=progress, stats=stats)
        result.changed = bool(result.actions)
        return result
    finally:
        master.logout()


def _join(spec: PoolSpec, password: Secret, member: str, master_host: dict[str, Any],
          result: PoolResult, *, dry_run: bool, progress: Progress,
          stats: CallStats | None) -> None:
    name = url_host(member)
    try:
        x = _probe(spec, password, member, stats)
    except XapiError as exc:
        if exc.code == "HOST_IS_SLAVE":
            other = exc.params[0] if exc.params else "?"
            if other in _host_keys(master_host):
                return  # joined already (still restarting as a slave)
            raise PoolError("HOST_IS_SLAVE", exc.params,
                            message=f"{name} is a member of another pool (master {other})",
                            hint=f"eject it there first: xenctl --master {other} pool eject {name}"
                            ) from exc
        raise
    try:
        others = x.call("host.get_all")
        if len(others) > 1:
            raise PoolError("JOINING_HOST_CANNOT_BE_MASTER_OF_OTHER_HOSTS", [],
                            message=f"{name} is the master of a pool of {len(others)} hosts",
                            hint="eject its members first, or make it the pool.master")
        result.actions.append(f"join {name} to the pool of {master_host.get('name_label')}")
        if dry_run:
            return
        progress(f"{name}: pool.join {master_host.get('address')}")
        x.call("pool.join", master_host.get("address"), spec.username, password.reveal())
    finally:
        x.logout()


def _wait_hosts_up(master: Xapi, expected: int, timeout: float, progress: Progress) -> None:
    watcher = EventWatcher(master.fork(), ["host", "host_metrics"], poll_timeout=10.0).start()
    try:
        def all_up() -> bool | None:
            hosts = watcher.objects.get("host", {})
            metrics = watcher.objects.get("host_metrics", {})
            up = [h for h in hosts.values()
                  if h.get("enabled") and metrics.get(h.get("metrics", NULL), {}).get("live")]
            return True if len(hosts) >= expected and len(up) == len(hosts) else None
        progress(f"waiting for {expected} hosts to be live and enabled")
        watcher.wait_for(all_up, timeout, f"{expected} hosts to be live and enabled")
    finally:
        hosts = list(watcher.objects.get("host", {}))
        watcher.stop((lambda: master.call("event.inject", "host", hosts[0])) if hosts else None)


def _check_replicas(spec: PoolSpec, password: Secret, master: Xapi, pool_uuid: str, *,
                    synced: bool, progress: Progress, stats: CallStats | None) -> None:
    hosts = master.call("host.get_all_records")
    pool = master.call("pool.get_all_records")
    master_ref = next(iter(pool.values()))["master"]
    for ref, h in hosts.items():
        if ref == master_ref:
            continue
        url = replace_host(master.url, str(h.get("address")))
        for attempt in (0, 1):
            local = _probe(spec, password, url, stats, local=True)
            try:
                replica = local.call("pool.get_all_records")
            finally:
                local.logout()
            uuids = {str(p.get("uuid")) for p in replica.values()}
            if pool_uuid in uuids:
                break
            if attempt == 0 and not synced:
                progress(f"{h.get('name_label')}: replica is stale; pool.sync_database")
                master.call("pool.sync_database")
                synced = True
                continue
            raise PoolError("REPLICA_MISMATCH", [str(h.get("name_label"))],
                            message=f"{h.get('name_label')}'s database replica does not hold "
                                    f"pool {pool_uuid} (it has {sorted(uuids)})",
                            hint="check the host's connectivity to the master and rerun")


def pool_eject(xapi: Xapi, host: str, *, dry_run: bool = False,
               progress: Progress = _noop) -> PoolResult:
    result = PoolResult()
    hosts = xapi.call("host.get_all_records")
    pool_ref, pool = next(iter(xapi.call("pool.get_all_records").items()))
    _ = pool_ref
    try:
        ref = find_host(hosts, host)
    except PoolError:
        if url_host(host) not in {k for h in hosts.values() for k in _host_keys(h)}:
            return result  # not in the pool: nothing to do (idempotent)
        raise
    name = str(hosts[ref].get("name_label"))
    result.master = str(hosts[pool["master"]].get("name_label"))
    if ref == pool["master"]:
        raise PoolError("CANNOT_EJECT_MASTER", [name], message=f"{name} is the pool master",
                        hint="move the master first: xenctl pool failover --to ANOTHER_HOST")
    busy = []
    for vm in hosts[ref].get("resident_VMs", []):
        rec = xapi.call("VM.get_record", vm)
        if not rec.get("is_control_domain") and rec.get("power_state") != "Halted":
            busy.append(str(rec.get("name_label")))
    if busy:
        raise PoolError("OPERATION_NOT_ALLOWED", ["VM resident on host"],
                        message=f"{name} still runs {len(busy)} VM(s): {', '.join(sorted(busy))}",
                        hint="scale the nodes down or migrate them first; ejecting wipes the host")
    result.actions.append(f"eject {name} (it reboots as a standalone host; its local storage is lost)")
    result.changed = True
    if not dry_run:
        progress(f"ejecting {name}")
        xapi.call("pool.eject", ref)
    return result


def _wait_master(spec: PoolSpec, password: Secret, url: str, timeout: float,
                 stats: CallStats | None) -> Xapi:
    """Log in at ``url`` until it answers as the master (not HOST_IS_SLAVE, not booting)."""
    deadline = time.monotonic() + timeout
    delay = 0.25
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            x = _probe(spec, password, url, stats, timeout=10.0)
            pool = next(iter(x.call("pool.get_all_records").values()))
            address = x.call("host.get_address", pool["master"])
            if address == url_host(url):
                return x
            x.logout()
        except (XapiError, XapiConnectionError) as exc:
            last = exc
        time.sleep(delay)  # xapi is restarting: nothing to subscribe to until it is back
        delay = min(delay * 2, 4.0)
    raise WaitTimeout(f"{url_host(url)} did not come back as master within {timeout:.0f}s"
                      + (f" (last: {last})" if last else ""))


def pool_failover(spec: PoolSpec, password: Secret, *, to: str | None = None,
                  emergency: bool = False, dry_run: bool = False, progress: Progress = _noop,
                  stats: CallStats | None = None, timeout: float = 300.0) -> PoolResult:
    """Move the master role. Planned: ``pool.designate_new_master`` (the master is alive).
    ``emergency``: the master is dead; a member takes over from its database replica
    (``pool.emergency_transition_to_master``) and ``pool.recover_slaves`` repoints the others."""
    if emergency:
        return _emergency(spec, password, to=to, dry_run=dry_run, progress=progress, stats=stats,
                          timeout=timeout)
    result = PoolResult()
    master = Xapi(spec.master, spec.username, password, spec.tls, stats=stats).login()
    try:
        hosts = master.call("host.get_all_records")
        metrics = master.call("host_metrics.get_all_records")
        pool_ref, pool = next(iter(master.call("pool.get_all_records").items()))
        _ = pool_ref
        current = pool["master"]

        def live(ref: str) -> bool:
            return bool(metrics.get(hosts[ref].get("metrics"), {}).get("live"))
        if to:
            target = find_host(hosts, to)
        else:
            members = sorted((r for r in hosts if r != current and live(r)
                              and hosts[r].get("enabled")),
                             key=lambda r: str(hosts[r].get("name_label")))
            if not members:
                raise PoolError("NO_MEMBER", [], message="no live member to hand the master role to")
            target = members[0]
        tname = str(hosts[target].get("name_label"))
        result.master = tname
        if target == current:
            return result
        if not live(target):
            raise PoolError("HOST_NOT_LIVE", [tname], message=f"{tname} is not live")
        result.actions.append(f"designate {tname} as the new master "
                              f"(was {hosts[current].get('name_label')})")
        result.changed = True
        if dry_run:
            return result
        progress(f"pool.designate_new_master {tname}")
        try:
            master.call("pool.designate_new_master", target)
        except XapiConnectionError:
            pass  # the old master restarts as a slave; the check below decides
        url = replace_host(master.url, str(hosts[target].get("address")))
        progress(f"waiting for {tname} to answer as master")
        new = _wait_master(spec, password, url, timeout, stats)
        new.logout()
        return result
    finally:
        master.logout()


def _emergency(spec: PoolSpec, password: Secret, *, to: str | None, dry_run: bool,
               progress: Progress, stats: CallStats | None, timeout: float) -> PoolResult:
    result = PoolResult()
    # 1. who is the master, and is it really dead?
    dead_url = spec.master
    for url in spec.all_hosts:
        try:
            x = _probe(spec, password, url, stats, timeout=10.0)
        except XapiError as exc:
            if exc.code == "HOST_IS_SLAVE" and exc.params:
                dead_url = replace_host(url, exc.params[0])
                break
            continue
        except XenctlError:
            continue
        # a host answered as a master: is it the pool's master with members, or standalone?
        try:
            pool = next(iter(x.call("pool.get_all_records").values()))
            hosts = x.call("host.get_all_records")
            if len(hosts) > 1 or url == spec.master:
                result.master = str(hosts[pool["master"]].get("name_label"))
                raise PoolError("MASTER_ALIVE", [url_host(url)],
                                message=f"the master {url_host(url)} is alive",
                                hint="use `xenctl pool failover` without --emergency")
        finally:
            x.logout()
    try:
        x = _probe(spec, password, dead_url, stats, timeout=10.0)
        x.logout()
        raise PoolError("MASTER_ALIVE", [url_host(dead_url)],
                        message=f"the master {url_host(dead_url)} answers",
                        hint="use `xenctl pool failover` without --emergency")
    except XapiConnectionError:
        progress(f"master {url_host(dead_url)} is unreachable")
    except XapiError as exc:
        if exc.code != "HOST_IS_SLAVE":
            raise
    # 2. pick the member to promote
    candidates = [u for u in spec.all_hosts if url_host(u) != url_host(dead_url)]
    by_address = bool(to) and any(to in (u, url_host(u)) for u in candidates)
    if to and by_address:
        candidates = [u for u in candidates if to in (u, url_host(u))]
    elif to and ("://" in to or to.replace(".", "").isdigit() or ":" in to):
        candidates = [replace_host(spec.master, url_host(to) if "://" in to else to)]
    for url in candidates:
        try:
            local = _probe(spec, password, url, stats, local=True, timeout=10.0)
        except XenctlError as exc:
            progress(f"{url_host(url)}: cannot log in locally ({exc})")
            continue
        name = url_host(url)
        if to and not by_address and not _is_host(local, url_host(url), to):
            local.logout()  # --to names another host (by name_label, hostname or uuid)
            continue
        result.master = name
        result.actions.append(f"promote {name} (pool.emergency_transition_to_master), "
                              "then pool.recover_slaves")
        result.changed = True
        if dry_run:
            local.logout()
            return result
        progress(f"{name}: pool.emergency_transition_to_master")
        try:
            local.call("pool.emergency_transition_to_master")
        except XapiConnectionError:
            pass  # xapi restarts as master
        finally:
            with suppress(XenctlError):
                local.logout()
        progress(f"waiting for {name} to answer as master")
        new = _wait_master(spec, password, url, timeout, stats)
        try:
            progress("pool.recover_slaves")
            recovered = new.call("pool.recover_slaves")
            hosts = new.call("host.get_all_records")
            names = [str(hosts.get(r, {}).get("name_label", r)) for r in recovered]
            if names:
                result.actions.append(f"recovered {', '.join(sorted(names))}")
        finally:
            new.logout()
        return result
    if to:
        raise PoolError("HOST_NOT_FOUND", [to],
                        message=f"no reachable member matches --to {to!r}",
                        hint="give a member's address, name or uuid as listed by pool status")
    raise PoolError("NO_MEMBER", [], message="no member could be reached to take over",
                    hint="check the members' addresses and the password")


def _is_host(local: Xapi, address: str, wanted: str) -> bool:
    """Whether the host at ``address`` is ``wanted`` (name_label, hostname or uuid), read from
    its own replica of the pool database (the master is dead)."""
    try:
        hosts = local.call("host.get_all_records")
    except XenctlError:
        return False
    return any(h.get("address") == address and wanted in (h.get("name_label"), h.get("hostname"),
                                                          h.get("uuid"))
               for h in hosts.values())
