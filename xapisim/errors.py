"""Errors: one class per XenAPI error code, generated from (and validated against) the data file.

``XenAPIError`` is a failure that travels to the client as ``ErrorDescription = [code, *params]``.
Every code the simulator raises must exist in the datamodel and carry the parameter count xapi
raises it with (``params_as_raised`` where verified, else the documented ``params``); a mismatch is
a simulator bug and is reported as ``INTERNAL_ERROR`` rather than sent with the wrong shape.

    raise errors.VM_BAD_POWER_STATE(vm, "halted", "running")
    raise errors.failure("HOST_IS_SLAVE", master_address)
"""

from __future__ import annotations

import re
from typing import Any

from .datamodel import load


class XapisimError(Exception):
    """Root of every exception this package raises."""


class ConfigError(XapisimError, ValueError):
    """Bad simulator configuration (config file, SimConfig, CLI flags)."""


class UnknownHost(XapisimError, KeyError):
    """No simulated host by that name or address."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown host"


class XenAPIError(XapisimError):
    """A XenAPI failure: the client sees ``ErrorDescription = [code, *params]``."""

    code: str = ""
    arity: int | None = None

    def __init__(self, *params: Any) -> None:
        self.params = [str(p) for p in params]
        super().__init__(self.code, *self.params)

    @property
    def description(self) -> list[str]:
        return [self.code, *self.params]

    def __str__(self) -> str:
        return " ".join(self.description)


# Special wire failures that are not datamodel error codes.
class Fault(XenAPIError):
    """``["Fault", text]``: e.g. Async.<msg> on a message without an async mode (server_helpers.ml)."""

    code = "Fault"
    arity = 1


_SR_BACKEND = re.compile(r"^SR_BACKEND_FAILURE_\d+$")
_classes: dict[str, type[XenAPIError]] = {}


def _make(code: str, arity: int | None, doc: str) -> type[XenAPIError]:
    cls = type(code, (XenAPIError,), {"code": code, "arity": arity, "__doc__": doc or code})
    return cls


def error_class(code: str) -> type[XenAPIError]:
    """The exception class for a datamodel error code (or SR_BACKEND_FAILURE_<n>)."""
    if code in _classes:
        return _classes[code]
    if _SR_BACKEND.match(code):
        cls = _make(code, 3, "Storage backend failure (sm_exec.ml): ['', reason, stderr]")
        _classes[code] = cls
        return cls
    raise KeyError(f"{code} is not a XenAPI error code in the datamodel")


def failure(code: str, *params: Any) -> XenAPIError:
    """Build the failure for ``code``; refuses unknown codes and wrong parameter counts."""
    if code == "Fault":
        return Fault(*params)
    cls = error_class(code)
    if cls.arity is not None and len(params) != cls.arity:
        return _classes["INTERNAL_ERROR"](
            f"xapisim bug: {code} raised with {len(params)} params, xapi uses {cls.arity}"
        )
    return cls(*params)


for _code, _e in load().errors.items():
    _classes[_code] = _make(_code, _e.arity, _e.description)
    globals()[_code] = _classes[_code]


def all_codes() -> list[str]:
    return sorted(_classes)


def __getattr__(name: str) -> type[XenAPIError]:  # typed access for the generated classes
    try:
        return _classes[name]
    except KeyError:
        raise AttributeError(name) from None
