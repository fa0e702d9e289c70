"""Processes xenctl's helpers leave behind, ended by PID.

``ansible-playbook`` runs its workers in its own session and every ``ssh`` in yet another one,
and ssh connection masters (ControlPersist) detach from it all. When a deploy is interrupted,
killing ``ansible-playbook`` leaves them running. While the deploy runs xenctl is therefore a
*child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): whatever ansible leaves orphaned becomes
xenctl's child, so xenctl can end exactly those processes, by PID, and reap them. Nothing here
looks processes up by name. Linux only; elsewhere these are no-ops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterable
from contextlib import suppress

__all__ = ["children", "end_children", "set_subreaper"]

PR_SET_CHILD_SUBREAPER = 36


def set_subreaper(on: bool) -> bool:
    """Become (or stop being) the reaper of orphaned descendants. False if not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: str) -> list[str]:
    """/proc/PID/stat fields after the command name: state, ppid, pgrp, session, ..."""
    with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
        return f.read().rsplit(")", 1)[1].split()


def children(parent: int | None = None) -> set[int]:
    """PIDs of ``parent``'s (default: this process's) children, zombies included."""
    me = os.getpid() if parent is None else parent
    found: set[int] = set()
    if not os.path.isdir("/proc"):
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_stat(entry)[1]) == me:
                found.add(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def end_children(keep: Iterable[int] = (), *, only: Iterable[int] | None = None,
                 timeout: float = 10.0) -> int:
    """SIGKILL and reap this process's children except ``keep`` (or only those in ``only``),
    repeating while killed processes' own orphans arrive (we are their subreaper). Bounded by
    ``timeout``. Returns how many processes were ended."""
    keep_set = set(keep)
    only_set = None if only is None else set(only)
    ended = 0
    deadline = time.monotonic() + timeout
    while True:
        targets = {p for p in children() - keep_set if only_set is None or p in only_set}
        if not targets:
            return ended
        for pid in targets:
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in targets:
            with suppress(ChildProcessError, OSError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    ended += 1
        if time.monotonic() > deadline:
            return ended
        time.sleep(0.05)
