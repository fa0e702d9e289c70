"""Guest backends, by name. Heavy backends are imported only when asked for."""

from __future__ import annotations

import importlib
from typing import Any

from .base import GuestBackend, GuestSpec

BACKENDS = {
    "memory": "xapisim.backends.memory:MemoryBackend",
    "lab": "xapisim.backends.lab:LabBackend",
    "libvirt": "xapisim.backends.libvirt:LibvirtBackend",
}


def load_backend(name: str, **options: Any) -> GuestBackend:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown guest backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    backend: GuestBackend = cls(**options)
    return backend


__all__ = ["BACKENDS", "GuestBackend", "GuestSpec", "load_backend"]
