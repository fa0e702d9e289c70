"""Allocation of lab names and subnets, and the on-disk record of every live lab.

Every lab has a directory ``/run/medstream-labnet/<prefix>/`` holding ``state.json`` (owner PID and
start time, subnet, bridge, hosts). Allocation runs under an exclusive flock on
``/run/medstream-labnet/.lock``, so labs created at the same moment by different processes (other
test runs, other engineers) never get the same prefix or /24. A lab whose owner is dead is a
leftover; :func:`labnet.cleanup.cleanup_dead` removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _sys
from .errors import LabError

STATE_ROOT = Path(os.environ.get("LABNET_STATE_DIR", "/run/medstream-labnet"))
SUPERNET = ipaddress.IPv4Network("10.213.0.0/16")
# Hand-made rigs (LABNET.md, examples in the docs) use low third octets: allocate above them.
FIRST_OCTET, LAST_OCTET = 32, 254


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """The global labnet lock (one flock shared by every process on this machine)."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    fd = os.open(STATE_ROOT / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def state_path(prefix: str) -> Path:
    return STATE_ROOT / prefix / "state.json"


def read_state(prefix: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(state_path(prefix).read_text())
        return data
    except (OSError, ValueError):
        return None


def write_state(prefix: str, state: dict[str, Any]) -> None:
    path = state_path(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)


def all_states() -> dict[str, dict[str, Any] | None]:
    """Every lab directory under the state root, with its state (None if unreadable)."""
    if not STATE_ROOT.is_dir():
        return {}
    return {p.name: read_state(p.name) for p in sorted(STATE_ROOT.iterdir())
            if p.is_dir() and p.name.startswith("ms") and len(p.name) == 6}


def _addresses_in_use() -> set[ipaddress.IPv4Network]:
    """/24s of 10.213.0.0/16 seen on any interface or route, in the root and in every netns."""
    used: set[ipaddress.IPv4Network] = set()

    def scan(text: str) -> None:
        for tok in text.split():
            if not tok.startswith("10.213."):
                continue
            try:
                iface = ipaddress.IPv4Interface(tok)
            except ValueError:
                continue
            net = iface.network
            if net.prefixlen >= 24:
                used.add(ipaddress.IPv4Network(f"{iface.ip}/24", strict=False))
            else:  # a wider route: every /24 it covers is taken
                used.update(net.subnets(new_prefix=24))

    scan(_sys.ip("-4", "-o", "addr", "show", check=False).stdout)
    scan(_sys.ip("-4", "route", "show", "table", "all", check=False).stdout)
    for ns in _sys.netns_list():
        scan(_sys.ip("-n", ns, "-4", "-o", "addr", "show", check=False).stdout)
    return used


def allocate(owner_pid: int, workdir: Path | None) -> dict[str, Any]:
    """Pick a fresh prefix and a free /24 and record them (call under :func:`locked`)."""
    states = all_states()
    taken_nets = _addresses_in_use()
    for st in states.values():
        if st and "subnet" in st:
            taken_nets.add(ipaddress.IPv4Network(st["subnet"]))
    links = set(_sys.link_names())
    nets = _sys.netns_list()
    prefix = ""
    for _ in range(100):
        cand = "ms" + secrets.token_hex(2)
        if cand in states or any(n.startswith(cand) for n in links) or any(
                n.startswith(cand) for n in nets):
            continue
        prefix = cand
        break
    if not prefix:
        raise LabError("could not find an unused lab prefix")
    octets = list(range(FIRST_OCTET, LAST_OCTET + 1))
    start = secrets.randbelow(len(octets))  # spread labs out: fewer near-collisions with hand rigs
    subnet = None
    for i in range(len(octets)):
        net = ipaddress.IPv4Network(f"10.213.{octets[(start + i) % len(octets)]}.0/24")
        if net not in taken_nets:
            subnet = net
            break
    if subnet is None:
        raise LabError("no free /24 left in 10.213.0.0/16 (run `python -m labnet cleanup`?)")
    labdir = (workdir if workdir is not None else STATE_ROOT) / prefix
    state: dict[str, Any] = {
        "prefix": prefix,
        "subnet": str(subnet),
        "owner_pid": owner_pid,
        "owner_start": _sys.pid_start_time(owner_pid),
        "labdir": str(labdir),
        "bridge": f"{prefix}br",
        "hosts": {},
    }
    write_state(prefix, state)
    return state
