"""Unit tests without sockets: error mapping, placement, planning, IP choice, session helpers."""

from __future__ import annotations

import errno
import ipaddress
import ssl
import xmlrpc.client
from typing import Any

import pytest
import XenAPI

from xenctl.errors import (
    CapacityError,
    CredentialsError,
    NotFoundError,
    PlanError,
    TLSError,
    TransientError,
    XapiConnectionError,
    XapiError,
    XenctlError,
    map_xapi_errors,
)
from xenctl.events import task_result_ref
from xenctl.nodes import (
    JOURNAL_PREFIX,
    TAG_CLOUD,
    TAG_INDEX,
    PoolView,
    find_ip,
    node_footprint,
    plan_scale,
)
from xenctl.placement import HostCapacity, plan_placement
from xenctl.session import _method_of, is_read_only, replace_host
from xenctl.spec import GiB, load_spec

# ----------------------------------------------------------------------------- errors


def test_failure_keeps_code_params_and_hint() -> None:
    with pytest.raises(CapacityError) as exc, map_xapi_errors():
        raise XenAPI.Failure(["HOST_NOT_ENOUGH_FREE_MEMORY", "1090519040", "524288000"])
    err = exc.value
    assert err.code == "HOST_NOT_ENOUGH_FREE_MEMORY"
    assert err.params == ["1090519040", "524288000"]
    assert "free memory" in str(err)
    assert isinstance(err.__cause__, XenAPI.Failure)


def test_leaves_inherit_builtins() -> None:
    with pytest.raises(LookupError), map_xapi_errors():
        raise XenAPI.Failure(["HANDLE_INVALID", "VM", "OpaqueRef:x"])
    with pytest.raises(NotFoundError), map_xapi_errors():
        raise XenAPI.Failure(["UUID_INVALID", "VM", "u"])
    with pytest.raises(TransientError), map_xapi_errors():
        raise XenAPI.Failure(["TOO_MANY_PENDING_TASKS"])
    with pytest.raises(PermissionError) as exc, map_xapi_errors():
        raise XenAPI.Failure(["SESSION_AUTHENTICATION_FAILED", "root", "secret-echo"])
    assert isinstance(exc.value, CredentialsError)
    assert "secret-echo" not in str(exc.value)  # the reason may echo input; never shown


def test_transport_errors() -> None:
    with pytest.raises(XapiConnectionError, match="cannot reach https://h") as exc, \
            map_xapi_errors("https://h"):
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert isinstance(exc.value, ConnectionError)
    with pytest.raises(TLSError, match="not trusted"), map_xapi_errors("https://h"):
        raise ssl.SSLCertVerificationError(1, "certificate verify failed")
    with pytest.raises(XapiError) as exc2, map_xapi_errors():
        raise xmlrpc.client.Fault(500, "Tried 3 times to get a valid session, but failed")
    assert exc2.value.code == "SESSION_INVALID"
    with pytest.raises(XapiConnectionError, match="HTTP 404"), map_xapi_errors():
        raise xmlrpc.client.ProtocolError("h/x", 404, "Not Found", {})
    # xenctl errors pass through unchanged
    with pytest.raises(PlanError), map_xapi_errors():
        raise PlanError("x")
    assert issubclass(PlanError, XenctlError) and issubclass(PlanError, ValueError)


# ----------------------------------------------------------------------------- placement

def hosts(*free: int, down: int = -1) -> list[HostCapacity]:
    return [HostCapacity(f"OpaqueRef:{i}", f"host-{i + 1}", f, live=i != down)
            for i, f in enumerate(free)]


def test_spread_is_even_on_equal_hosts_and_favours_free_memory() -> None:
    plan = plan_placement(hosts(10 * GiB, 10 * GiB, 10 * GiB), 9, GiB)
    names = [h.name for h in plan]
    assert {n: names.count(n) for n in set(names)} == {"host-1": 3, "host-2": 3, "host-3": 3}
    plan = plan_placement(hosts(4 * GiB, 2 * GiB), 4, GiB)
    assert [h.name for h in plan] == ["host-1", "host-1", "host-2", "host-1"]


def test_pack_fills_one_host_first() -> None:
    plan = plan_placement(hosts(3 * GiB, 10 * GiB), 4, GiB, "pack")
    assert [h.name for h in plan] == ["host-1", "host-1", "host-1", "host-2"]


def test_shortfall_names_the_missing_memory() -> None:
    with pytest.raises(PlanError) as exc:
        plan_placement(hosts(3 * GiB, 2 * GiB, 9 * GiB, down=2), 7, GiB)
    msg = str(exc.value)
    assert "cannot hold 7 more node(s) of 1.0 GiB: room for 5, short by 2.0 GiB" in msg
    assert "host-1 3.0 GiB free" in msg and "down or disabled: host-3" in msg
    assert "nothing was changed" in msg


# ----------------------------------------------------------------------------- planning

NULL = "OpaqueRef:NULL"


def vm(name: str, index: int | None, *, state: str = "Running", host: str = "OpaqueRef:h1",
       template: bool = False, cloud: str = "medstream") -> dict[str, Any]:
    oc = {TAG_CLOUD: cloud, TAG_INDEX: str(index)} if index is not None else {}
    return {"name_label": name, "other_config": oc, "power_state": state,
            "resident_on": host if state == "Running" else NULL, "is_a_template": template,
            "is_control_domain": False, "is_a_snapshot": False}


def view(vms: dict[str, dict[str, Any]], free: int = 20 * GiB, journal: dict[str, str] | None = None
         ) -> PoolView:
    hosts = {f"OpaqueRef:h{i}": {"name_label": f"host-{i}", "enabled": True,
                                 "metrics": f"OpaqueRef:m{i}"} for i in (1, 2)}
    metrics = {f"OpaqueRef:m{i}": {"live": True} for i in (1, 2)}
    return PoolView("OpaqueRef:p", {"other_config": journal or {}}, hosts, metrics, vms, {},
                    {h: free for h in hosts})


SPEC = load_spec(None, env={"XENCTL_MASTER": "h1"})


def test_plan_creates_missing_removes_highest_cleans_half_built() -> None:
    vms = {
        "OpaqueRef:a": vm("node-01", 1),
        "OpaqueRef:b": vm("node-03", 3, state="Halted"),
        "OpaqueRef:c": vm("node-04", 4),
        "OpaqueRef:d": vm("node-05", 5, template=True),  # never provisioned: half-built
        "OpaqueRef:e": vm("other", None),  # not ours (no tag): never touched, even if named node-*
        "OpaqueRef:f": vm("node-02", 2, cloud="another-cloud"),
    }
    plan = plan_scale(view(vms), SPEC, 3)
    got = [(s.action, s.index) for s in plan.steps]
    assert got == [("cleanup", 5), ("remove", 4), ("start", 3), ("create", 2), ("wait", 1)]
    assert plan.changes
    plan = plan_scale(view({"OpaqueRef:a": vm("node-01", 1)}), SPEC, 1)
    assert not plan.changes and [s.action for s in plan.steps] == ["wait"]


def test_plan_scale_down_order_and_journal() -> None:
    vms = {f"OpaqueRef:{i}": vm(f"node-{i:02d}", i) for i in range(1, 7)}
    journal = {f"{JOURNAL_PREFIX}medstream/9": "node-09", f"{JOURNAL_PREFIX}other/1": "x"}
    plan = plan_scale(view(vms, journal=journal), SPEC, 2)
    assert [s.index for s in plan.of("remove")] == [6, 5, 4, 3]
    assert plan.journal == {f"{JOURNAL_PREFIX}medstream/9": "node-09"}


def test_plan_counts_memory_freed_by_removals_and_refuses_shortfall() -> None:
    fp = node_footprint(GiB, 1)
    vms = {"OpaqueRef:a": vm("node-01", 1)}
    with pytest.raises(PlanError, match="cannot hold 9 more"):
        plan_scale(view(vms, free=4 * fp), SPEC, 10)
    plan = plan_scale(view(vms, free=4 * fp), SPEC, 9)
    hosts_used = [s.host_name for s in plan.of("create")]
    assert hosts_used.count("host-1") == 4 and hosts_used.count("host-2") == 4
    # node-05 is removed (index > 4): its memory on host-1 counts for the 3 new nodes
    vms["OpaqueRef:e"] = vm("node-05", 5)
    plan = plan_scale(view(vms, free=fp), SPEC, 4)
    assert [s.index for s in plan.of("create")] == [2, 3, 4]
    with pytest.raises(PlanError):
        plan_scale(view({"OpaqueRef:a": vm("node-01", 1)}, free=fp), SPEC, 4)


def test_find_ip_prefers_device_zero_and_cidr() -> None:
    nets = {"1/ip": "10.0.0.9", "0/ipv4/0": "192.168.1.5", "0/ip": "192.168.1.5",
            "0/ipv6/0": "fe80::1", "0/ipv4/1": "10.213.5.7"}
    assert find_ip(nets, None) == "192.168.1.5"
    assert find_ip(nets, ipaddress.ip_network("10.213.5.0/24")) == "10.213.5.7"
    assert find_ip(nets, ipaddress.ip_network("10.0.0.0/24")) == "10.0.0.9"
    assert find_ip({"0/ip": "169.254.0.3"}, None) is None
    assert find_ip({}, None) is None


def test_task_result_decoding() -> None:
    assert task_result_ref("<value>OpaqueRef:abc</value>") == "OpaqueRef:abc"
    assert task_result_ref("<value></value>") == ""
    assert task_result_ref("") == ""


# ----------------------------------------------------------------------------- session helpers

def test_read_only_classification() -> None:
    assert is_read_only("VM.get_record") and is_read_only("event.from")
    assert is_read_only("host.compute_free_memory")
    for m in ("VM.clone", "Async.VM.clone", "VM.start_on", "pool.join", "VM.set_other_config",
              "task.destroy", "pool.add_to_other_config"):
        assert not is_read_only(m), m


def test_replace_host_keeps_scheme_and_port() -> None:
    assert replace_host("https://10.0.0.1:8443/", "10.0.0.2") == "https://10.0.0.2:8443/"
    assert replace_host("https://h:443", "fd00::2") == "https://[fd00::2]:443/"


def test_method_name_from_body() -> None:
    body = xmlrpc.client.dumps(("s", "x"), "Async.VM.clone").encode()
    assert _method_of(body) == "Async.VM.clone"


def test_orphans_are_adopted_and_ended_by_pid() -> None:
    """What xenctl does around ansible-playbook: a child that leaves a detached grandchild
    (double fork + setsid, like an ssh ControlPersist master) behind; as child subreaper the
    grandchild becomes ours and end_children kills and reaps exactly it."""
    import os
    import subprocess
    import sys

    from xenctl import procs

    before = procs.children()
    assert procs.set_subreaper(True)
    try:
        script = ("import os, time\n"
                  "if os.fork() == 0:\n"
                  "    os.setsid()\n"
                  "    time.sleep(120)\n"
                  "    os._exit(0)\n")
        subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
        adopted = procs.children() - before
        assert len(adopted) == 1  # the grandchild, reparented to us when its parent exited
        (pid,) = adopted
        assert procs.end_children(only=adopted) == 1
        assert not os.path.exists(f"/proc/{pid}")  # killed and reaped (no zombie)
    finally:
        procs.set_subreaper(False)
    assert procs.children() == before


def test_throwaway_deploy_log_tail_is_shown(tmp_path: Any) -> None:
    from xenctl.up import _show_log_tail

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "site-20260101-000000.log").write_text("old\n")
    (logs / "site-20260101-000001.log").write_text("".join(f"line {i}\n" for i in range(60)))
    got: list[str] = []
    _show_log_tail(tmp_path, got.append)
    assert got[0].startswith("last 40 lines of the deploy log")
    assert got[1:] == [f"  | line {i}" for i in range(20, 60)]
    _show_log_tail(tmp_path / "nothing", got.append)  # no log: nothing said
    assert len(got) == 41
