"""Check a handler's Python result against the datamodel result type before it goes on the wire.

The dispatcher runs this on every successful call (set XAPISIM_CHECK_RESULTS=0 to skip), so a
handler that returned, say, a str where xapi returns an int, is caught as INTERNAL_ERROR in tests
instead of silently teaching clients the wrong shape.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from .datamodel import load

_MAP = re.compile(r"^\((.+) -> (.+)\) map$")


def problem(t: str, v: Any, where: str = "result") -> str | None:
    """None if ``v`` fits type ``t``, else a description of the first mismatch."""
    dm = load()
    if t == "void":
        return None if v in ("", None) else f"{where}: void returned {v!r}"
    if t == "event record set":  # event.from's struct (special case in the datamodel meta)
        if isinstance(v, dict) and {"events", "valid_ref_counts", "token"} <= set(v):
            return None
        if isinstance(v, list):  # event.next
            return None
        return f"{where}: not an event.from struct"
    if t == "int":
        return None if isinstance(v, int) and not isinstance(v, bool) else f"{where}: int expected, got {v!r}"
    if t == "float":
        return None if isinstance(v, float) else f"{where}: float expected, got {v!r}"
    if t == "bool":
        return None if isinstance(v, bool) else f"{where}: bool expected, got {v!r}"
    if t == "datetime":
        return None if isinstance(v, dt.datetime) else f"{where}: datetime expected, got {v!r}"
    if t == "string":
        return None if isinstance(v, str) else f"{where}: string expected, got {v!r}"
    if t.endswith(" ref"):
        return None if isinstance(v, str) and v.startswith("OpaqueRef:") else f"{where}: ref expected, got {v!r}"
    if t.endswith(" set"):
        if not isinstance(v, list):
            return f"{where}: list expected, got {type(v).__name__}"
        for i, item in enumerate(v):
            p = problem(t[:-4], item, f"{where}[{i}]")
            if p:
                return p
        return None
    m = _MAP.match(t)
    if m:
        if not isinstance(v, dict):
            return f"{where}: map expected, got {type(v).__name__}"
        for k, item in v.items():
            p = problem(m.group(2), item, f"{where}[{k}]")
            if p:
                return p
        return None
    if t.startswith("enum "):
        return None if v in dm.enums[t[5:]] else f"{where}: {v!r} not in {t}"
    if t.endswith(" record"):
        cls = t[: -len(" record")]
        if cls not in dm.classes:
            return None if isinstance(v, dict) else f"{where}: record expected"
        if not isinstance(v, dict) or set(v) != set(dm.classes[cls].fields):
            return f"{where}: {cls} record with wrong fields"
        for name, f in dm.classes[cls].fields.items():
            p = problem(f.type, v[name], f"{where}.{name}")
            if p:
                return p
        return None
    if t.endswith(" option"):
        return None
    return f"{where}: unknown type {t}"
