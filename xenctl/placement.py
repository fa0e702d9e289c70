"""Placement: which host each new node VM starts on. Pure functions, no I/O.

``spread``: each new node goes to the live, enabled host with the most free memory after the nodes
already planned (ties: fewer fleet nodes, then name), so identical hosts get equal shares and a
fuller host gets fewer. ``pack``: best fit, the host with the least free memory that still holds
the node, so whole hosts stay free.

When the pool cannot hold the request the planner raises :class:`PlanError` naming the shortfall
before anything is created.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import PlanError

__all__ = ["HostCapacity", "format_bytes", "plan_placement"]


@dataclass(frozen=True)
class HostCapacity:
    ref: str
    name: str
    free_memory: int  # bytes, as host.compute_free_memory reports it
    live: bool = True
    enabled: bool = True
    fleet_nodes: int = 0  # nodes of this fleet already resident

    @property
    def usable(self) -> bool:
        return self.live and self.enabled


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def plan_placement(hosts: Sequence[HostCapacity], count: int, footprint: int,
                   policy: str = "spread") -> list[HostCapacity]:
    """Hosts for ``count`` new nodes of ``footprint`` bytes each, in creation order."""
    if count <= 0:
        return []
    if footprint <= 0:
        raise ValueError("footprint must be positive")
    if policy not in ("spread", "pack"):
        raise ValueError(f"unknown placement policy {policy!r}")
    usable = [h for h in hosts if h.usable]
    free = {h.ref: h.free_memory for h in usable}
    nodes = {h.ref: h.fleet_nodes for h in usable}
    plan: list[HostCapacity] = []
    for _ in range(count):
        fits = [h for h in usable if free[h.ref] >= footprint]
        if not fits:
            break
        if policy == "spread":
            best = min(fits, key=lambda h: (-free[h.ref], nodes[h.ref], h.name))
        else:
            best = min(fits, key=lambda h: (free[h.ref], -nodes[h.ref], h.name))
        plan.append(best)
        free[best.ref] -= footprint
        nodes[best.ref] += 1
    if len(plan) < count:
        capacity = sum(h.free_memory // footprint for h in usable)
        short = (count - capacity) * footprint
        down = [h.name for h in hosts if not h.usable]
        per_host = ", ".join(f"{h.name} {format_bytes(h.free_memory)} free" for h in usable) or "no usable host"
        raise PlanError(
            f"the pool cannot hold {count} more node(s) of {format_bytes(footprint)}: room for "
            f"{capacity}, short by {format_bytes(short)} ({per_host}"
            + (f"; down or disabled: {', '.join(down)}" if down else "") + ")",
            hint="lower nodes.count or nodes.memory, free memory, or add hosts; nothing was changed")
    return plan
