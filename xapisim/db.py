"""The XenAPI object database of one pool: records per class, generations for event.from.

A record is a plain dict field -> Python value (int, float, bool, str, datetime, list, dict);
``wire.value_xml`` writes it the way xapi does. Reverse relations (``VM.VIFs``, ``host.resident_VMs``,
``SR.VDIs`` ...) are not stored: they are computed from the forward refs, as xapi's DB does, and a
change of a forward ref marks both ends modified so event.from reports them.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

from . import errors
from .datamodel import Field, load
from .wire import EPOCH

NULL = "OpaqueRef:NULL"

# (class, set field) -> (class holding the forward ref, forward field)
RELATIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("host", "resident_VMs"): ("VM", "resident_on"),
    ("host", "PIFs"): ("PIF", "host"),
    ("host", "PBDs"): ("PBD", "host"),
    ("host", "host_CPUs"): ("host_cpu", "host"),
    ("VM", "VIFs"): ("VIF", "VM"),
    ("VM", "VBDs"): ("VBD", "VM"),
    ("VM", "snapshots"): ("VM", "snapshot_of"),
    ("VM", "children"): ("VM", "parent"),
    ("VDI", "VBDs"): ("VBD", "VDI"),
    ("VDI", "snapshots"): ("VDI", "snapshot_of"),
    ("SR", "VDIs"): ("VDI", "SR"),
    ("SR", "PBDs"): ("PBD", "SR"),
    ("network", "VIFs"): ("VIF", "network"),
    ("network", "PIFs"): ("PIF", "network"),
    ("task", "subtasks"): ("task", "subtask_of"),
    ("session", "tasks"): ("task", "session"),  # tasks carry no session field: always empty
}
# forward (class, field) -> list of (target class, reverse field)
FORWARD: dict[tuple[str, str], list[tuple[str, str]]] = {}
for (_tc, _tf), (_fc, _ff) in RELATIONS.items():
    FORWARD.setdefault((_fc, _ff), []).append((_tc, _tf))


def new_ref() -> str:
    return f"OpaqueRef:{uuidlib.uuid4()}"


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def parse_datetime(value: str) -> dt.datetime:
    for fmt in ("%Y%m%dT%H:%M:%SZ", "%Y%m%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return dt.datetime.strptime(value, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            continue
    raise ValueError(value)


def default_for(f: Field) -> Any:
    t = f.type
    if f.has_default:
        v = f.default
        if t == "datetime" and isinstance(v, str):
            return parse_datetime(v)
        if t == "float" and isinstance(v, int):
            return float(v)
        return copy.deepcopy(v)
    if t == "string":
        return ""
    if t == "int":
        return 0
    if t == "float":
        return 0.0
    if t == "bool":
        return False
    if t == "datetime":
        return EPOCH
    if t.endswith(" ref"):
        return NULL
    if t.endswith(" set"):
        return []
    if t.endswith(" map"):
        return {}
    if t.startswith("enum "):
        return load().enums[t[5:]][0]
    return ""


def coerce(t: str, value: Any, name: str) -> Any:
    """Unmarshal a wire value to the datamodel type ``t`` (xapi accepts ints as strings)."""
    try:
        if t == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if t == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if t in ("string",) or t.endswith(" ref"):
            if not isinstance(value, str):
                raise ValueError
            return value
        if t == "datetime":
            if isinstance(value, dt.datetime):
                return value
            return parse_datetime(str(getattr(value, "value", value)))
        if t.endswith(" set"):
            if not isinstance(value, list | tuple):
                raise ValueError
            inner = t[: -len(" set")]
            return [coerce(inner, v, name) for v in value]
        m = re.match(r"^\((.+) -> (.+)\) map$", t)
        if m:
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): coerce(m.group(2), v, name) for k, v in value.items()}
        if t.startswith("enum "):
            values = load().enums[t[5:]]
            for v in values:
                if isinstance(value, str) and v.lower() == value.lower():
                    return v
            raise errors.failure("INVALID_VALUE", name, str(value))
        if t.endswith(" record"):
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (ValueError, TypeError):
        raise errors.failure("FIELD_TYPE_ERROR", name) from None
    return value


class Database:
    """Records of one pool. Not thread-safe on its own: the model's lock guards it."""

    def __init__(self) -> None:
        self.dm = load()
        self.tables: dict[str, dict[str, dict[str, Any]]] = {c: {} for c in self.dm.classes}
        self.gen = 0
        self.created: dict[str, int] = {}
        self.modified: dict[str, int] = {}
        self.class_of: dict[str, str] = {}
        self.tombstones: list[tuple[int, str, str, int]] = []  # (deleted gen, class, ref, created gen)

    def clone(self) -> Database:
        new = Database.__new__(Database)
        new.dm = self.dm
        new.tables = copy.deepcopy(self.tables)
        new.gen = self.gen
        new.created = dict(self.created)
        new.modified = dict(self.modified)
        new.class_of = dict(self.class_of)
        new.tombstones = list(self.tombstones)
        return new

    # -- records -------------------------------------------------------------------------------
    def create(self, cls: str, ref: str | None = None, **values: Any) -> str:
        cdef = self.dm.classes[cls]
        rec: dict[str, Any] = {}
        for name, f in cdef.fields.items():
            if (cls, name) in RELATIONS:
                continue
            rec[name] = default_for(f)
        for k, v in values.items():
            if k not in cdef.fields:
                raise KeyError(f"{cls} has no field {k}")
            rec[k] = v
        if not rec.get("uuid"):
            rec["uuid"] = new_uuid()
        ref = ref or new_ref()
        self.gen += 1
        self.tables[cls][ref] = rec
        self.class_of[ref] = cls
        self.created[ref] = self.gen
        self.modified[ref] = self.gen
        for fname, val in rec.items():
            for tcls, _ in FORWARD.get((cls, fname), []):
                self._touch_target(tcls, val)
        return ref

    def _touch_target(self, cls: str, ref: Any) -> None:
        if isinstance(ref, str) and ref in self.tables.get(cls, {}):
            self.modified[ref] = self.gen

    def exists(self, cls: str, ref: str) -> bool:
        return ref in self.tables[cls]

    def get(self, cls: str, ref: str) -> dict[str, Any]:
        try:
            return self.tables[cls][ref]
        except KeyError:
            raise errors.failure("HANDLE_INVALID", cls, ref) from None

    def record(self, cls: str, ref: str) -> dict[str, Any]:
        """The full record as get_record returns it (with computed reverse relations)."""
        rec = dict(self.get(cls, ref))
        for name in self.dm.classes[cls].fields:
            if (cls, name) in RELATIONS:
                rec[name] = self.reverse(cls, name, ref)
        return {k: rec[k] for k in self.dm.classes[cls].fields if k in rec}

    def reverse(self, cls: str, field: str, ref: str) -> list[str]:
        fcls, ffield = RELATIONS[(cls, field)]
        if fcls not in self.tables:
            return []
        cache = self.__dict__.setdefault("_reverse_cache", {})
        hit = cache.get((fcls, ffield))
        if hit is None or hit[0] != self.gen:  # every write bumps gen, so a stale index is never used
            index: dict[str, list[str]] = {}
            for r, rec in self.tables[fcls].items():
                target = rec.get(ffield)
                if isinstance(target, str):
                    index.setdefault(target, []).append(r)
            hit = (self.gen, index)
            cache[(fcls, ffield)] = hit
        return list(hit[1].get(ref, []))

    def field(self, cls: str, ref: str, name: str) -> Any:
        if (cls, name) in RELATIONS:
            self.get(cls, ref)
            return self.reverse(cls, name, ref)
        return self.get(cls, ref)[name]

    def set(self, cls: str, ref: str, name: str, value: Any) -> None:
        rec = self.get(cls, ref)
        old = rec.get(name)
        self.gen += 1
        rec[name] = value
        self.modified[ref] = self.gen
        for tcls, _ in FORWARD.get((cls, name), []):
            self._touch_target(tcls, old)
            self._touch_target(tcls, value)

    def update(self, cls: str, ref: str, **values: Any) -> None:
        for k, v in values.items():
            self.set(cls, ref, k, v)

    def touch(self, ref: str) -> None:
        if ref in self.class_of:
            self.gen += 1
            self.modified[ref] = self.gen

    def destroy(self, cls: str, ref: str) -> None:
        rec = self.get(cls, ref)
        self.gen += 1
        del self.tables[cls][ref]
        for fname, val in rec.items():
            for tcls, _ in FORWARD.get((cls, fname), []):
                self._touch_target(tcls, val)
        self.tombstones.append((self.gen, cls, ref, self.created.pop(ref, 0)))
        self.modified.pop(ref, None)
        self.class_of.pop(ref, None)

    def all(self, cls: str) -> Iterator[tuple[str, dict[str, Any]]]:
        yield from list(self.tables[cls].items())

    def find(self, cls: str, **eq: Any) -> list[str]:
        return [
            r for r, rec in self.tables[cls].items() if all(rec.get(k) == v for k, v in eq.items())
        ]

    def by_uuid(self, cls: str, uuid: str) -> str:
        for r, rec in self.tables[cls].items():
            if rec.get("uuid") == uuid:
                return r
        raise errors.failure("UUID_INVALID", cls, uuid)

    def one(self, cls: str) -> str:
        return next(iter(self.tables[cls]))
