"""The XenAPI datamodel subset (classes, fields, messages, errors), loaded from the data file.

``data/datamodel-subset.json`` is a verbatim copy of ``shared/xenapi/datamodel-subset.json``
(extracted from xapi-project/xen-api at commit e2ee48d6). Everything the simulator exposes on the
wire is looked up here, so it cannot invent a call or a field that real XenAPI lacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    optional: bool = False


@dataclass(frozen=True)
class Message:
    cls: str
    name: str
    kind: str
    params: tuple[Param, ...]
    result: str
    errors: tuple[str, ...]
    is_async: bool
    session_required: bool
    constructor_args: tuple[tuple[str, bool], ...] = ()

    @property
    def wire_name(self) -> str:
        return f"{self.cls}.{self.name}"

    @property
    def call_params(self) -> tuple[Param, ...]:
        """Parameters after the session (the ones a client passes)."""
        return self.params[1:] if self.session_required else self.params

    @property
    def required_count(self) -> int:
        return sum(1 for p in self.call_params if not p.optional)


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    qualifier: str
    default: Any = None
    has_default: bool = False


@dataclass
class ClassDef:
    name: str
    generates_events: bool
    fields: dict[str, Field] = field(default_factory=dict)
    messages: dict[str, Message] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorDef:
    code: str
    params: tuple[str, ...]
    description: str

    @property
    def arity(self) -> int:
        return len(self.params)


@dataclass
class Datamodel:
    raw: dict[str, Any]
    classes: dict[str, ClassDef]
    errors: dict[str, ErrorDef]
    enums: dict[str, list[str]]

    def message(self, wire_name: str) -> Message | None:
        cls, _, name = wire_name.partition(".")
        cdef = self.classes.get(cls)
        if cdef is None:
            return None
        return cdef.messages.get(name)

    def all_messages(self) -> list[Message]:
        return [m for c in self.classes.values() for m in c.messages.values()]

    def class_by_lower(self, name: str) -> str | None:
        for c in self.classes:
            if c.lower() == name.lower():
                return c
        return None

    @property
    def tables(self) -> dict[str, Any]:
        tables: dict[str, Any] = self.raw["implementation_tables"]
        return tables


def _load_raw() -> dict[str, Any]:
    text = resources.files("xapisim").joinpath("data/datamodel-subset.json").read_text("utf-8")
    raw: dict[str, Any] = json.loads(text)
    return raw


@cache
def load() -> Datamodel:
    raw = _load_raw()
    classes: dict[str, ClassDef] = {}
    for cname, c in raw["classes"].items():
        cdef = ClassDef(cname, bool(c["generates_events"]))
        for f in c["fields"]:
            cdef.fields[f["name"]] = Field(
                f["name"], f["type"], f["qualifier"], f.get("default"), "default" in f
            )
        for m in c["messages"]:
            cdef.messages[m["name"]] = Message(
                cls=cname,
                name=m["name"],
                kind=m["kind"],
                params=tuple(
                    Param(p["name"], p["type"], bool(p.get("optional", False))) for p in m["params"]
                ),
                result=m["result"]["type"],
                errors=tuple(m.get("errors", [])),
                is_async=bool(m.get("async", False)),
                session_required=bool(m.get("session_required", True)),
                constructor_args=tuple(
                    (a["name"], bool(a["required"])) for a in m.get("constructor_args", [])
                ),
            )
        classes[cname] = cdef
    errors = {
        code: ErrorDef(code, tuple(e.get("params_as_raised", e["params"])), e.get("description", ""))
        for code, e in raw["errors"].items()
    }
    enums = {name: [v["name"] for v in values] for name, values in raw["enums"].items()}
    return Datamodel(raw, classes, errors, enums)
