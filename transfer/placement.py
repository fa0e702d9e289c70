"""Rendezvous (highest random weight) placement of objects on nodes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def score(node_key: str, object_key: str) -> int:
    h = hashlib.blake2b(f"{node_key}\x00{object_key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def place(
    object_key: str, nodes: Sequence[T], replicas: int, key_of: dict[int, str] | None = None
) -> list[T]:
    """The ``replicas`` nodes with the highest score for ``object_key`` (best first).

    Adding or removing a node only moves the objects that land on (or left) that node.
    ``key_of`` maps ``id(node)`` to its stable key; by default ``str(node)``.
    """
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    ranked = sorted(
        nodes,
        key=lambda n: score(key_of[id(n)] if key_of else str(n), object_key),
        reverse=True,
    )
    return ranked[: min(replicas, len(ranked))]
