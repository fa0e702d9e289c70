"""Helpers shared by the xapisim tests."""

from __future__ import annotations

import time
from typing import Any

import pytest
import XenAPI

from xapisim import SimServer

NODE_TEMPLATE = "CentOS 7 (medstream node)"


def join_all(sim: SimServer) -> None:
    """Join every other host to host-1, each call made on the joiner (as xapi requires)."""
    master = sim.hosts[0]
    for h in sim.hosts[1:]:
        s = sim.session(h.name)
        s.xenapi.pool.join(master.address, sim.username, sim.password)


def failure(fn: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as info:
        fn(*args)
    details: list[str] = info.value.details
    return details


def event_from(x: Any, classes: list[str], token: str, timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = getattr(x.event, "from")(classes, token, timeout)
    return result


def new_vm(x: Any, name: str, template: str = NODE_TEMPLATE) -> str:
    """The canonical install: clone the template, then provision (which clears is_a_template)."""
    tmpl = x.VM.get_by_name_label(template)[0]
    vm: str = x.VM.clone(tmpl, name)
    x.VM.provision(vm)
    return vm


def wait_guest(x: Any, vm: str, timeout: float = 10.0) -> str:
    """Wait (with event.from, no polling) until the guest agent reports; returns the guest IP."""
    token = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gm = x.VM.get_guest_metrics(vm)
        if gm != "OpaqueRef:NULL":
            ip: str = x.VM_guest_metrics.get_networks(gm)["0/ip"]
            return ip
        token = event_from(x, ["vm_guest_metrics", f"vm/{vm}"], token, 2.0)["token"]
    raise AssertionError("the guest never reported an IP")
