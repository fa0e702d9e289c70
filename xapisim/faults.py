"""Fault injection: make the Nth call of a message fail, drop its connection, or kill a host.

    sim.faults.fail("VM.start", code="HOST_NOT_ENOUGH_FREE_MEMORY", params=["1", "0"], nth=2)
    sim.faults.drop_connection("VM.clone", nth=1)
    sim.faults.kill_host("VM.start", host="host-1", nth=3)   # the host dies as that call arrives

Counting is per wire name (``Async.`` stripped), across all hosts, from the moment the rule is
added; ``nth=0`` means every call. Rules also load from the ``faults:`` list of a config file.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .errors import ConfigError


@dataclass
class FaultRule:
    message: str
    nth: int = 1
    action: str = "error"  # error | drop | kill_host
    code: str = ""
    params: list[str] = field(default_factory=list)
    host: str = ""
    seen: int = 0
    fired: int = 0

    def hit(self) -> bool:
        self.seen += 1
        if self.nth == 0 or self.seen == self.nth:
            self.fired += 1
            return True
        return False


@dataclass
class FaultDecision:
    action: str
    error: errors.XenAPIError | None = None
    host: str = ""


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rules: list[FaultRule] = []

    def fail(self, message: str, code: str, params: list[Any] | None = None, nth: int = 1) -> FaultRule:
        """Make the nth call of ``message`` fail with ``[code, *params]`` (a real code, right arity)."""
        try:
            cls = errors.error_class(code) if code != "Fault" else None
        except KeyError:
            raise ConfigError(f"{code} is not a XenAPI error code in the datamodel") from None
        if cls is not None and cls.arity is not None and len(params or []) != cls.arity:
            raise ConfigError(f"{code} takes {cls.arity} params, got {len(params or [])}")
        return self._add(FaultRule(message, nth, "error", code, [str(p) for p in params or []]))

    def drop_connection(self, message: str, nth: int = 1) -> FaultRule:
        return self._add(FaultRule(message, nth, "drop"))

    def kill_host(self, message: str, host: str, nth: int = 1) -> FaultRule:
        return self._add(FaultRule(message, nth, "kill_host", host=host))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _add(self, rule: FaultRule) -> FaultRule:
        if rule.nth < 0:
            raise ConfigError("nth must be >= 0")
        with self._lock:
            self.rules.append(rule)
        return rule

    def check(self, message: str) -> FaultDecision | None:
        if message.startswith("Async."):
            message = message[len("Async."):]
        with self._lock:
            for rule in self.rules:
                if rule.message == message and rule.hit():
                    if rule.action == "error":
                        return FaultDecision("error", errors.failure(rule.code, *rule.params))
                    return FaultDecision(rule.action, host=rule.host)
        return None

    def load(self, items: object) -> None:
        if items is None:
            return
        if not isinstance(items, list):
            raise ConfigError("faults must be a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "message" not in item:
                raise ConfigError(f"faults[{i}] needs a 'message'")
            nth = int(item.get("nth", 1))
            if "error" in item:
                err = item["error"]
                if isinstance(err, str):
                    err = [err]
                if not isinstance(err, list) or not err:
                    raise ConfigError(f"faults[{i}].error must be [CODE, params...]")
                try:
                    self.fail(item["message"], str(err[0]), [str(p) for p in err[1:]], nth)
                except ConfigError as e:
                    raise ConfigError(f"faults[{i}]: {e}") from None
            elif item.get("drop"):
                self.drop_connection(item["message"], nth)
            elif "kill_host" in item:
                self.kill_host(item["message"], str(item["kill_host"]), nth)
            else:
                raise ConfigError(f"faults[{i}] needs one of error, drop, kill_host")
