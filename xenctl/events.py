"""Waiting on XenAPI objects with ``event.from``, never by polling.

Strategy: one :class:`EventWatcher` thread owns its own session and long-polls
``event.from(classes, token, timeout)``; it keeps the latest snapshot of every object of the
watched classes and wakes waiters (a ``threading.Condition``). Any number of worker threads wait
on predicates over that cache (a task finishing, a VM's guest metrics showing an IP) with their own
deadlines. The first call (token ``""``) returns a snapshot of everything, so the cache is
complete from the start; later calls return only changes.
"""

from __future__ import annotations

import logging
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .errors import Interrupted, WaitTimeout, XenctlError, error_for_code
from .session import Xapi

__all__ = ["EventWatcher", "task_result_ref"]

log = logging.getLogger("xenctl")
T = TypeVar("T")


def task_result_ref(result: str) -> str:
    """Decode a task's ``result`` (the XML-RPC encoding of the return value, as xapi stores it)."""
    text = (result or "").strip()
    if not text:
        return ""
    if not text.startswith("<value>"):
        return text
    try:
        params, _ = xmlrpc.client.loads(f"<params><param>{text}</param></params>")
    except Exception:  # noqa: BLE001 - a malformed result is reported by the caller
        return ""
    return str(params[0]) if params else ""


class EventWatcher:
    """Cache of objects of ``classes`` kept current by an ``event.from`` loop in a thread."""

    def __init__(self, xapi: Xapi, classes: Iterable[str], *, poll_timeout: float = 30.0,
                 coalesce: float = 0.1) -> None:
        self.xapi = xapi
        # after a batch, wait this long so changes arriving together come in one call (xapi
        # itself batches event.from answers the same way: event_from_delay)
        self.coalesce = coalesce
        self.classes = [c.lower() for c in classes]
        self.poll_timeout = poll_timeout
        self.objects: dict[str, dict[str, dict[str, Any]]] = {c: {} for c in self.classes}
        self.deleted: set[str] = set()
        self.cond = threading.Condition()
        self.error: XenctlError | None = None
        self.aborted: str | None = None  # why abort() was called
        self.generation = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xenctl-events", daemon=True)
        self._first = threading.Event()
        self.token = ""

    def start(self, timeout: float = 60.0) -> EventWatcher:
        self._thread.start()
        if not self._first.wait(timeout):
            raise WaitTimeout(f"no answer to event.from within {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        return self

    def stop(self, wake: Callable[[], None] | None = None) -> None:
        """Stop the loop. ``wake`` (e.g. an ``event.inject``) shortens the wait for the pending
        ``event.from`` to return; otherwise it returns within ``poll_timeout``."""
        self._stop.set()
        if wake is not None:
            try:
                wake()
            except XenctlError:
                pass
        self._thread.join(self.poll_timeout + 10)
        self.xapi.logout()

    def abort(self, why: str = "interrupted") -> None:
        """Make every current and future :meth:`wait_for` raise :class:`Interrupted` at once
        (the event loop itself goes on until :meth:`stop`)."""
        with self.cond:
            self.aborted = why
            self.cond.notify_all()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.xapi.call("event.from", self.classes, self.token, float(self.poll_timeout))
                with self.cond:
                    for ev in batch.get("events", []):
                        cls = str(ev.get("class", "")).lower()
                        ref = str(ev.get("ref", ""))
                        store = self.objects.setdefault(cls, {})
                        if ev.get("operation") == "del":
                            store.pop(ref, None)
                            self.deleted.add(ref)
                        elif "snapshot" in ev:
                            store[ref] = ev["snapshot"]
                    self.token = str(batch.get("token", self.token))
                    self.generation += 1
                    self.cond.notify_all()
                self._first.set()
                if batch.get("events") and self.coalesce > 0:
                    self._stop.wait(self.coalesce)
        except XenctlError as exc:
            log.debug("event loop ended: %s", exc)
            with self.cond:
                if not self._stop.is_set():
                    self.error = exc
                self.cond.notify_all()
        finally:
            self._first.set()

    # ------------------------------------------------------------------ waiting
    def get(self, cls: str, ref: str) -> dict[str, Any] | None:
        with self.cond:
            return self.objects.get(cls.lower(), {}).get(ref)

    def wait_for(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        """Block until ``predicate()`` (called under the lock) returns something not None."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                result = predicate()
                if result is not None:
                    return result
                if self.aborted is not None:
                    raise Interrupted(f"{self.aborted} while waiting for {what}")
                if self.error is not None:
                    raise self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
                self.cond.wait(left)

    def wait_object(self, cls: str, ref: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_for(lambda: self.objects.get(cls.lower(), {}).get(ref), timeout,
                             f"{cls} {ref} to appear")

    def wait_task(self, task: str, timeout: float, what: str) -> str:
        """Wait for a task to finish; return its decoded result or raise its error."""
        def done() -> dict[str, Any] | None:
            rec = self.objects.get("task", {}).get(task)
            if rec is not None and rec.get("status") not in ("pending", "cancelling"):
                return rec
            return None
        rec = self.wait_for(done, timeout, what)
        status = rec.get("status")
        if status == "success":
            return task_result_ref(str(rec.get("result", "")))
        info = [str(x) for x in rec.get("error_info") or []] or ["TASK_FAILED", str(status)]
        if status == "cancelled" and info[0] != "TASK_CANCELLED":
            info = ["TASK_CANCELLED", task]
        err = error_for_code(info[0], info[1:])
        raise err

