"""Teardown of a lab by its record and by its name prefix, and removal of labs whose owner died."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

from . import _sys, state as _state
from .errors import LabError

PREFIX_RE = re.compile(r"^ms[0-9a-f]{4}$")


def teardown(prefix: str, st: dict[str, Any] | None) -> list[str]:
    """Remove everything of lab ``prefix``: processes in its namespaces (SIGKILL by PID), the
    namespaces, veths and bridge (qdiscs go with the devices), its directory and state.
    Works from the record and also by scanning names, so a half-created lab goes too."""
    if not PREFIX_RE.match(prefix):
        raise LabError(f"not a lab prefix: {prefix!r}")
    removed: list[str] = []
    netns = {ns for ns in _sys.netns_list() if ns.startswith(prefix + "-")}
    if st:
        netns |= {h["netns"] for h in st.get("hosts", {}).values()} & set(_sys.netns_list())
    # kill everything first (all namespaces), then wait: faster than one namespace at a time
    errors: list[str] = []
    try:
        _sys.kill_netns_processes_many(sorted(netns))
    except LabError as exc:
        errors.append(str(exc))
    _sys.ip_batch([f"netns del {ns}" for ns in sorted(netns)], check=False)
    removed += [f"netns {ns}" for ns in sorted(netns)]
    links = [name for name in _sys.link_names() if name.startswith(prefix)]
    links.sort(key=lambda n: n.endswith("br"))  # veths first, bridge last
    _sys.ip_batch([f"link del {name}" for name in links], check=False)
    removed += [f"link {name}" for name in links]
    if st and st.get("labdir"):
        from .lab import close_ssh_masters
        ips = [h["ip"] for h in st.get("hosts", {}).values() if "ip" in h]
        close_ssh_masters(Path(st["labdir"]) / "ssh_config", ips)
    dirs = {_state.STATE_ROOT / prefix}
    if st and st.get("labdir"):
        labdir = Path(st["labdir"])
        if labdir.name == prefix:  # never anything but the lab's own directory
            dirs.add(labdir)
    for d in dirs:
        if d.exists():
            # overlays vanish with the last process of their mount namespace; retry briefly
            for _ in range(50):
                shutil.rmtree(d, ignore_errors=True)
                if not d.exists():
                    break
                time.sleep(0.1)
            removed.append(f"dir {d}")
    left: list[str] = []
    for _ in range(100):  # netns deletion frees veths asynchronously: allow it a moment
        left = [ns for ns in _sys.netns_list() if ns.startswith(prefix + "-")]
        left += [n for n in _sys.link_names() if n.startswith(prefix)]
        if not left:
            break
        _sys.ip_batch([f"link del {n}" for n in left if not n.startswith(prefix + "-")],
                      check=False)
        time.sleep(0.05)
    if left or errors:
        raise LabError(f"lab {prefix}: teardown left {', '.join(left + errors)}")
    return removed


def list_labs() -> list[dict[str, Any]]:
    """Every lab on this machine: prefix, subnet, owner, whether the owner is alive, hosts."""
    labs = []
    for prefix, st in _state.all_states().items():
        st = st or {}
        alive = bool(st) and _sys.pid_alive(int(st.get("owner_pid", 0)), st.get("owner_start"))
        labs.append({"prefix": prefix, "subnet": st.get("subnet", "?"),
                     "owner_pid": st.get("owner_pid"), "alive": alive,
                     "hosts": {n: h.get("ip") for n, h in st.get("hosts", {}).items()},
                     "labdir": st.get("labdir")})
    # namespaces that look like ours but have no state dir (a crash before the record was written)
    known = {lab["prefix"] for lab in labs}
    orphans = {ns.split("-", 1)[0] for ns in _sys.netns_list() if "-" in ns}
    orphans |= {n[:6] for n in _sys.link_names() if n.endswith("br") and len(n) == 8}
    for prefix in sorted(orphans - known):
        if PREFIX_RE.match(prefix):
            labs.append({"prefix": prefix, "subnet": "?", "owner_pid": None, "alive": False,
                         "hosts": {}, "labdir": None})
    return labs


def cleanup_dead(*, include_alive: bool = False) -> list[str]:
    """Tear down every lab whose owner process is dead (or every lab, with include_alive)."""
    removed: list[str] = []
    with _state.locked():
        for lab in list_labs():
            if lab["alive"] and not include_alive:
                continue
            removed += teardown(lab["prefix"], _state.read_state(lab["prefix"]))
    return removed
