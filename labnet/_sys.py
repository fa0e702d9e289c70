"""Thin wrappers around the system tools labnet drives (ip, tc, kill), with one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence

from .errors import LabError

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
TC = "/usr/sbin/tc" if os.path.exists("/usr/sbin/tc") else "tc"


def run(argv: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; raise LabError with its stderr when check and it fails."""
    try:
        cp = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: not installed ({exc})") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}: timed out after {timeout:.0f}s") from None
    if check and cp.returncode != 0:
        msg = (cp.stderr or cp.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv)}: {msg[-1] if msg else f'exit {cp.returncode}'}")
    return cp


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([IP, *args], check=check)


def ip_batch(lines: Sequence[str], *, netns: str | None = None, check: bool = True) -> None:
    """Run many ip commands in one process (ip -batch -), optionally inside a netns. With
    check=False every line is tried (-force) and errors are ignored."""
    if not lines:
        return
    argv = [IP] + (["-n", netns] if netns else []) + ([] if check else ["-force"]) + ["-batch", "-"]
    run(argv, input="\n".join(lines) + "\n", check=check)


def tc_batch(lines: Sequence[str], *, netns: str | None = None, check: bool = True) -> None:
    """Run many tc commands in one process (tc -batch -), optionally inside a netns."""
    if not lines:
        return
    argv = ([IP, "netns", "exec", netns] if netns else []) + [TC, "-batch", "-"]
    run(argv, input="\n".join(lines) + "\n", check=check)


def netns_list() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    cp = ip("netns", "pids", netns, check=False)
    return [int(tok) for tok in cp.stdout.split() if tok.isdigit()]


def link_names() -> list[str]:
    out = ip("-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def kill_netns_processes(netns: str, *, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process whose network namespace is netns, by PID; wait until none is left."""
    return kill_netns_processes_many([netns], timeout=timeout)


def kill_netns_processes_many(namespaces: Sequence[str], *, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process in any of these network namespaces, by PID; wait until none is left."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for ns in namespaces for p in netns_pids(ns) if p != os.getpid()]
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise LabError(f"netns {', '.join(namespaces)}: processes {pids} survive SIGKILL")
        time.sleep(0.02)


def pid_start_time(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot), to tell a live owner from a reused PID."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_time: int | None) -> bool:
    now = pid_start_time(pid)
    return now is not None and (start_time is None or now == start_time)
