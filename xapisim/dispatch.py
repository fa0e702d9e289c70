"""The envelope and the dispatcher (moto's ``responses``): one XML-RPC call in, one struct out.

Order, as xapi's generated server does it (gen_server.ml, server_helpers.ml, session_check.ml):
strip ``Async.``; look the message up (unknown: session-check the first param, then
``MESSAGE_METHOD_UNKNOWN [name]``); arity (``MESSAGE_PARAMETER_COUNT_MISMATCH [name, expected,
received]``, both without the session and the optional params); unmarshal the arguments; session
(slave-local sessions pass; unknown -> ``SESSION_INVALID``; a normal session on a slave ->
``HOST_IS_SLAVE``); ``["Fault", ...]`` for Async of a non-async message; run. Implicit messages (getters, setters, get_record, get_all...) are served
generically from the datamodel; custom messages by handlers registered with ``@implements``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

from . import errors, typecheck, wire
from .datamodel import Message, load
from .db import RELATIONS, Database, coerce
from .models import EMERGENCY_CALLS, Ctx, XapiModel

log = logging.getLogger("xapisim")

Handler = Callable[..., Any]
HANDLERS: dict[str, Handler] = {}
READ_KINDS = {"getter", "get_record", "get_by_uuid", "get_by_name_label", "get_all",
              "get_all_records", "get_all_where", "get_all_records_where"}
# Async operations whose tasks advertise "cancel" (long-running, interruptible in xapi/xenopsd)
CANCELLABLE = {"VM.clone", "VM.copy", "VM.start", "VM.start_on", "VM.resume", "VM.resume_on",
               "VM.clean_shutdown", "VM.shutdown", "VM.pool_migrate", "VM.provision", "VDI.create"}
GENERIC_KINDS = READ_KINDS | {"setter", "add", "remove", "constructor", "destructor"}


CHECK_RESULTS = os.environ.get("XAPISIM_CHECK_RESULTS", "1") != "0"


class DropConnection(Exception):
    """Fault injection: close the connection without answering."""


def implements(*wire_names: str) -> Callable[[Handler], Handler]:
    """Register a custom handler ``fn(model, ctx, *args)`` for one or more wire names."""
    dm = load()

    def deco(fn: Handler) -> Handler:
        for name in wire_names:
            if dm.message(name) is None:
                raise KeyError(f"{name} is not a XenAPI message in the datamodel")
            HANDLERS[name] = fn
        return fn
    return deco


def _accessor_kind(msg: Message) -> tuple[str, str] | None:
    """A custom message that is really a field accessor (e.g. VM.set_other_config)."""
    fields = load().classes[msg.cls].fields
    for prefix, kind in (("set_", "setter"), ("add_to_", "add"), ("remove_from_", "remove"),
                         ("add_", "add"), ("remove_", "remove")):
        if msg.name.startswith(prefix) and msg.name[len(prefix):] in fields:
            fname = msg.name[len(prefix):]
            ftype = fields[fname].type
            n = len(msg.call_params)
            if kind == "setter" and n == 2:
                return kind, fname
            if kind == "add" and ((ftype.endswith(" map") and n == 3) or (ftype.endswith(" set") and n == 2)):
                return kind, fname
            if kind == "remove" and n == 2:
                return kind, fname
    return None


def is_implemented(msg: Message) -> bool:
    if msg.wire_name in HANDLERS:
        return True
    if msg.kind in GENERIC_KINDS - {"constructor", "destructor"}:
        return True
    return msg.kind == "custom" and _accessor_kind(msg) is not None


def resolve(msg: Message) -> Handler | None:
    if msg.wire_name in HANDLERS:
        return HANDLERS[msg.wire_name]
    if msg.kind in READ_KINDS:
        return _generic(msg, msg.kind)
    acc = _accessor_kind(msg)
    if msg.kind in ("setter", "add", "remove") and acc is not None:
        return _generic(msg, acc[0], acc[1])
    if msg.kind == "custom" and acc is not None:
        return _generic(msg, acc[0], acc[1])
    return None


def _field_of(msg: Message, prefix: str) -> str:
    return msg.name[len(prefix):]


def _generic(msg: Message, kind: str, fname: str | None = None) -> Handler:
    cls = msg.cls
    dm = load()

    if kind == "get_record":
        return lambda m, ctx, ref: ctx.db.record(cls, ref)
    if kind == "get_by_uuid":
        return lambda m, ctx, uuid: ctx.db.by_uuid(cls, uuid)
    if kind == "get_by_name_label":
        return lambda m, ctx, label: ctx.db.find(cls, name_label=label)
    if kind == "get_all":
        return lambda m, ctx: list(ctx.db.tables[cls])
    if kind == "get_all_records":
        return lambda m, ctx: {r: ctx.db.record(cls, r) for r in list(ctx.db.tables[cls])}
    if kind == "get_all_where":
        return lambda m, ctx, expr: [r for r in list(ctx.db.tables[cls]) if _where(expr)(ctx.db, cls, r)]
    if kind == "get_all_records_where":
        return lambda m, ctx, expr: {r: ctx.db.record(cls, r) for r in list(ctx.db.tables[cls])
                                     if _where(expr)(ctx.db, cls, r)}
    if kind == "getter":
        name = _field_of(msg, "get_")
        return lambda m, ctx, ref: ctx.db.field(cls, ref, name)
    name = fname or ""
    ftype = dm.classes[cls].fields[name].type if name else ""

    if kind == "setter":
        def setter(m: XapiModel, ctx: Ctx, ref: str, value: Any) -> str:
            ctx.db.set(cls, ref, name, value)
            m.notify()
            return ""
        return setter
    if kind == "add" and ftype.endswith(" map"):
        def add_to(m: XapiModel, ctx: Ctx, ref: str, key: str, value: Any) -> str:
            current = dict(ctx.db.get(cls, ref)[name])
            if key in current:
                raise errors.failure("MAP_DUPLICATE_KEY", cls, name, ctx.db.get(cls, ref)["uuid"], key)
            current[key] = value
            ctx.db.set(cls, ref, name, current)
            m.notify()
            return ""
        return add_to
    if kind == "add":
        def add(m: XapiModel, ctx: Ctx, ref: str, value: Any) -> str:
            current = list(ctx.db.get(cls, ref)[name])
            if value not in current:
                current.append(value)
                ctx.db.set(cls, ref, name, current)
                m.notify()
            return ""
        return add
    if kind == "remove" and ftype.endswith(" map"):
        def remove_from(m: XapiModel, ctx: Ctx, ref: str, key: str) -> str:
            current = dict(ctx.db.get(cls, ref)[name])
            if key in current:
                del current[key]
                ctx.db.set(cls, ref, name, current)
                m.notify()
            return ""
        return remove_from
    if kind == "remove":
        def remove(m: XapiModel, ctx: Ctx, ref: str, value: Any) -> str:
            current = list(ctx.db.get(cls, ref)[name])
            if value in current:
                current.remove(value)
                ctx.db.set(cls, ref, name, current)
                m.notify()
            return ""
        return remove
    raise KeyError(kind)


# -- get_all_records_where expression language: field "x" = "y", and, or, not, true, false -------
_TOKEN = re.compile(r'\s*(?:(\()|(\))|(=)|(<>)|"((?:[^"\\]|\\.)*)"|([A-Za-z_]+))')


def _where(expr: str) -> Callable[[Database, str, str], bool]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = expr.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise errors.failure("INVALID_VALUE", "expr", expr)
        pos = m.end()
        if m.group(1):
            tokens.append(("(", "("))
        elif m.group(2):
            tokens.append((")", ")"))
        elif m.group(3):
            tokens.append(("=", "="))
        elif m.group(4):
            tokens.append(("<>", "<>"))
        elif m.group(5) is not None:
            tokens.append(("str", m.group(5)))
        else:
            tokens.append(("word", m.group(6).lower()))
    i = 0

    def peek() -> tuple[str, str] | None:
        return tokens[i] if i < len(tokens) else None

    def take() -> tuple[str, str]:
        nonlocal i
        if i >= len(tokens):
            raise errors.failure("INVALID_VALUE", "expr", expr)
        i += 1
        return tokens[i - 1]

    Pred = Callable[[Database, str, str], bool]

    def operand() -> Callable[[Database, str, str], str]:
        kind, val = take()
        if kind == "word" and val == "field":
            k2, fname = take()
            if k2 != "str":
                raise errors.failure("INVALID_VALUE", "expr", expr)

            def get(db: Database, cls: str, ref: str) -> str:
                try:
                    v = db.field(cls, ref, fname)
                except KeyError:
                    return ""
                if isinstance(v, bool):
                    return "true" if v else "false"
                return str(v)
            return get
        if kind == "word" and val == "literal":
            _, lit = take()
            return lambda db, cls, ref: lit
        if kind == "str":
            return lambda db, cls, ref: val
        raise errors.failure("INVALID_VALUE", "expr", expr)

    def atom() -> Pred:
        tok = peek()
        if tok == ("word", "not"):
            take()
            inner = atom()
            return lambda db, c, r: not inner(db, c, r)
        if tok == ("word", "true"):
            take()
            return lambda db, c, r: True
        if tok == ("word", "false"):
            take()
            return lambda db, c, r: False
        if tok == ("(", "("):
            take()
            inner = disj()
            if take() != (")", ")"):
                raise errors.failure("INVALID_VALUE", "expr", expr)
            return inner
        left = operand()
        op, _ = take()
        right = operand()
        if op == "=":
            return lambda db, c, r: left(db, c, r) == right(db, c, r)
        if op == "<>":
            return lambda db, c, r: left(db, c, r) != right(db, c, r)
        raise errors.failure("INVALID_VALUE", "expr", expr)

    def conj() -> Pred:
        left = atom()
        while peek() == ("word", "and"):
            take()
            right, prev = atom(), left
            left = (lambda a, b: lambda db, c, r: a(db, c, r) and b(db, c, r))(prev, right)
        return left

    def disj() -> Pred:
        left = conj()
        while peek() == ("word", "or"):
            take()
            right, prev = conj(), left
            left = (lambda a, b: lambda db, c, r: a(db, c, r) or b(db, c, r))(prev, right)
        return left

    pred = disj()
    if i != len(tokens):
        raise errors.failure("INVALID_VALUE", "expr", expr)
    return pred


class Dispatcher:
    def __init__(self, model: XapiModel, faults: Any) -> None:
        self.model = model
        self.dm = load()
        self.faults = faults
        self.on_kill_request: Callable[[str], None] = model.kill_host

    # simulator bugs seen by any dispatcher in this process (tests assert it stays empty)
    bugs: list[str] = []

    def handle(self, node_name: str, method: str, params: tuple[Any, ...]) -> dict[str, Any]:
        try:
            return wire.success(self._dispatch(node_name, method, params))
        except errors.XenAPIError as e:
            if e.code == "INTERNAL_ERROR" and e.params and e.params[0].startswith("xapisim bug"):
                Dispatcher.bugs.append(f"{method}: {e.params[0]}")
            return wire.failure(e.description)
        except DropConnection:
            raise
        except Exception as e:  # a simulator bug: report it the way xapi reports OCaml exceptions
            log.exception("internal error in %s", method)
            Dispatcher.bugs.append(f"{method}: {type(e).__name__}: {e}")
            return wire.failure(["INTERNAL_ERROR", f"{type(e).__name__}: {e}"])

    def _session_ctx(self, node_name: str, session: Any, msg: Message | None) -> Ctx:
        m = self.model
        node = m.nodes[node_name]
        session = session if isinstance(session, str) else str(session)
        if session in node.local_sessions:
            db = node.db if node.is_master else node.replica
            if db is None:
                raise errors.failure("HOST_STILL_BOOTING")
            if not node.is_master and msg is not None and msg.kind not in READ_KINDS \
                    and msg.wire_name not in EMERGENCY_CALLS:
                raise errors.failure("HOST_IS_SLAVE", node.master_address)
            return Ctx(node, db, session, local=True)
        if not node.is_master:
            # session_check.ml: the session is read from the master's DB first (SESSION_INVALID if
            # unknown), then a non-pool session on a slave fails with HOST_IS_SLAVE
            master = m.node_by_address(node.master_address)
            if master is not None and master.alive and master.is_master and master.db is not None \
                    and session not in master.db.tables["session"]:
                raise errors.failure("SESSION_INVALID", session)
            raise errors.failure("HOST_IS_SLAVE", node.master_address)
        assert node.db is not None
        if session not in node.db.tables["session"]:
            raise errors.failure("SESSION_INVALID", session)
        return Ctx(node, node.db, session)

    def _dispatch(self, node_name: str, method: str, params: tuple[Any, ...]) -> Any:
        m = self.model
        is_async = method.startswith("Async.")
        name = method[len("Async."):] if is_async else method
        msg = self.dm.message(name)
        if msg is None:
            if params:
                with m.lock:
                    self._session_ctx(node_name, params[0], None)
            raise errors.failure("MESSAGE_METHOD_UNKNOWN", name)  # server_helpers: prefix stripped
        args = list(params[1:] if msg.session_required else params)
        expected = msg.required_count
        if not expected <= len(args) <= len(msg.call_params):
            raise errors.failure("MESSAGE_PARAMETER_COUNT_MISMATCH", name, expected, len(args))
        # gen_server.ml unmarshals the arguments before the session check
        coerced = [coerce(p.type, a, p.name) for p, a in zip(msg.call_params, args, strict=False)]
        with m.lock:
            if msg.session_required:
                ctx = self._session_ctx(node_name, params[0], msg)
            else:
                node = m.nodes[node_name]
                db = node.db if node.is_master else node.replica
                ctx = Ctx(node, db if db is not None else m.nodes[node_name].db or _empty_db(), "")
        if is_async and not msg.is_async:
            raise errors.failure("Fault", f"No async mode for this operation (rpc: {name})")
        decision = self.faults.check(name)
        if decision is not None:
            if decision.action == "error":
                assert decision.error is not None
                if is_async:  # the call returns a task; the task fails
                    injected = decision.error

                    def fail(m: XapiModel, ctx: Ctx, *args: Any) -> Any:
                        raise injected
                    return self._run_async(ctx, method, fail, [])
                raise decision.error
            if decision.action == "drop":
                raise DropConnection(name)
            if decision.action == "kill_host":
                self.on_kill_request(decision.host or node_name)
                if (decision.host or node_name) == node_name:
                    raise DropConnection(name)
        handler = resolve(msg)
        if handler is None:
            raise errors.failure("INTERNAL_ERROR", f"xapisim does not implement {name}")
        if CHECK_RESULTS:
            handler = _checked(msg, handler)
        if is_async:
            return self._run_async(ctx, method, handler, coerced)
        with m.lock:
            return handler(m, ctx, *coerced)

    def _run_async(self, ctx: Ctx, method: str, handler: Handler, args: list[Any]) -> str:
        m = self.model
        name = method[len("Async."):]
        with m.lock:
            task = m.create_task(ctx, method, cancellable=name in CANCELLABLE)
        ctx.task = task
        ctx.op_ref = task
        db = ctx.db

        def run() -> None:
            m.local.task = (db, task)
            with m.lock:
                try:
                    value = handler(m, ctx, *args)
                except errors.XenAPIError as e:
                    if e.code == "INTERNAL_ERROR" and e.params and e.params[0].startswith("xapisim bug"):
                        Dispatcher.bugs.append(f"{method}: {e.params[0]}")
                    m.finish_task(db, task, error=e)
                except Exception as e:
                    log.exception("internal error in %s", method)
                    Dispatcher.bugs.append(f"{method}: {type(e).__name__}: {e}")
                    m.finish_task(db, task, error=errors.failure("INTERNAL_ERROR", f"{type(e).__name__}: {e}"))
                else:
                    m.finish_task(db, task, value=value)

        threading.Thread(target=run, name=f"xapisim-{method}", daemon=True).start()
        return task


def _checked(msg: Message, handler: Handler) -> Handler:
    def run(m: XapiModel, ctx: Ctx, *args: Any) -> Any:
        value = handler(m, ctx, *args)
        issue = typecheck.problem(msg.result, value, msg.wire_name)
        if issue:
            raise errors.failure("INTERNAL_ERROR", f"xapisim bug: {issue}")
        return value
    return run


def _empty_db() -> Database:
    return Database()


def implemented_messages() -> list[Message]:
    return [msg for msg in load().all_messages() if is_implemented(msg)]


_ = RELATIONS  # re-exported for coverage tooling
