"""Processes a test started, found from /proc, so that it can check none is left behind.

A process is named by (pid, start time): a pid reused by an unrelated process later is not
mistaken for the one that was seen."""

from __future__ import annotations

import os
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The start time (clock ticks after boot) of a live, non-zombie process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    found: set[tuple[int, str]] = set()
    todo = [root]
    while todo:
        for kid in children.get(todo.pop(), []):
            start = start_time(kid)
            if start is not None:
                found.add((kid, start))
            todo.append(kid)
    return found


def alive(seen: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those of ``seen`` still running (same pid, same start time)."""
    return {(pid, st) for pid, st in seen if start_time(pid) == st}
