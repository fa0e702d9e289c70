"""Conformance generated from the datamodel file: every implemented message's parameter count and
order, result types on the wire, and that every error the simulator raises is a real code with the
parameter count xapi raises it with."""

from __future__ import annotations

import ast
import inspect
import re
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from xsim_helpers import failure, join_all, new_vm

import xapisim
from xapisim import SimConfig, SimServer, errors
from xapisim.datamodel import Message, load
from xapisim.dispatch import HANDLERS, implemented_messages, is_implemented

DM = load()
IMPLEMENTED = implemented_messages()
DATETIME = re.compile(r"^\d{8}T\d{2}:\d{2}:\d{2}Z$")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[SimServer, Any]]:
    """A 3-host pool with a running VM (guest metrics reported), a task, a halted VM."""
    with SimServer(SimConfig(hosts=3, sync_interval=0, seed=2)) as sim:
        join_all(sim)
        x = sim.session("host-1").xenapi
        vm = new_vm(x, "conformance")
        x.VM.start(vm, False, False)
        deadline = time.monotonic() + 10
        while x.VM.get_guest_metrics(vm) == "OpaqueRef:NULL" and time.monotonic() < deadline:
            time.sleep(0.02)
        new_vm(x, "halted")
        x.Async.VM.get_possible_hosts(vm)
        yield sim, x


def check_type(t: str, v: Any, where: str) -> None:
    if t == "int":
        assert isinstance(v, str) and re.fullmatch(r"-?\d+", v), f"{where}: int not a decimal string: {v!r}"
    elif t == "float":
        assert isinstance(v, float), f"{where}: {v!r}"
    elif t == "bool":
        assert isinstance(v, bool), f"{where}: {v!r}"
    elif t == "datetime":
        assert isinstance(v, xmlrpc.client.DateTime) and DATETIME.match(v.value), f"{where}: {v!r}"
    elif t == "string":
        assert isinstance(v, str), f"{where}: {v!r}"
    elif t.endswith(" ref"):
        assert isinstance(v, str) and v.startswith("OpaqueRef:"), f"{where}: {v!r}"
    elif t.endswith(" set"):
        assert isinstance(v, list), f"{where}: {v!r}"
        for item in v:
            check_type(t[:-4], item, where)
    elif t.endswith(" map"):
        m = re.match(r"^\((.+) -> (.+)\) map$", t)
        assert m and isinstance(v, dict), f"{where}: {v!r}"
        for k, item in v.items():
            assert isinstance(k, str)
            check_type(m.group(2), item, f"{where}[{k}]")
    elif t.startswith("enum "):
        assert v in DM.enums[t[5:]], f"{where}: {v!r} not in {t}"
    elif t.endswith(" record"):
        cls = t[: -len(" record")]
        assert isinstance(v, dict) and set(v) == set(DM.classes[cls].fields), where
        for name, f in DM.classes[cls].fields.items():
            check_type(f.type, v[name], f"{where}.{name}")
    else:
        raise AssertionError(f"{where}: unknown type {t}")


def first_object(x: Any, cls: str) -> str | None:
    refs = getattr(x, cls).get_all() if "get_all" in DM.classes[cls].messages else []
    return refs[0] if refs else None


@pytest.mark.parametrize("msg", [m for m in IMPLEMENTED], ids=lambda m: m.wire_name)
def test_parameter_count_is_checked(world: tuple[SimServer, Any], msg: Message) -> None:
    sim, x = world
    too_many = len(msg.call_params) + 1
    args = ["x"] * too_many
    session = sim.session("host-1")  # raw ServerProxy calls: the SDK intercepts logout/login
    proxy_call = getattr(session, msg.wire_name)
    if msg.session_required:
        raw = proxy_call(session.handle, *args)
    else:
        raw = proxy_call(*args)
    details = raw["ErrorDescription"]
    assert details == ["MESSAGE_PARAMETER_COUNT_MISMATCH", msg.wire_name, str(msg.required_count),
                       str(too_many)]


@pytest.mark.parametrize("name", sorted(HANDLERS), ids=str)
def test_custom_handler_signature_matches_datamodel(name: str) -> None:
    msg = DM.message(name)
    assert msg is not None
    sig = inspect.signature(HANDLERS[name])
    params = list(sig.parameters.values())[2:]  # after (model, ctx)
    assert len(params) == len(msg.call_params), f"{name}: {params} vs {msg.call_params}"
    for p, dp in zip(params, msg.call_params, strict=True):
        # same names in the same order (a Python keyword gets a trailing underscore: class -> class_)
        assert p.name in (dp.name, f"{dp.name}_"), f"{name}: parameter {p.name} where xapi has {dp.name}"
        assert (p.default is not inspect.Parameter.empty) == dp.optional, f"{name}.{dp.name}"


@pytest.mark.parametrize("cls", [c for c in DM.classes if "get_all_records" in DM.classes[c].messages])
def test_records_and_getters_have_datamodel_types(world: tuple[SimServer, Any], cls: str) -> None:
    sim, x = world
    api = getattr(x, cls)
    records = api.get_all_records()
    assert records, f"no {cls} objects in the conformance world"
    check_type(f"(string -> {cls} record) map", records, f"{cls}.get_all_records")
    ref = next(iter(records))
    check_type(f"{cls} record", api.get_record(ref), f"{cls}.get_record")
    assert api.get_by_uuid(records[ref]["uuid"]) == ref
    for msg in DM.classes[cls].messages.values():
        if msg.kind == "getter":
            field = DM.classes[cls].fields[msg.name[4:]]
            check_type(field.type, getattr(api, msg.name)(ref), msg.wire_name)
            check_type(msg.result, getattr(api, msg.name)(ref), msg.wire_name)


@pytest.mark.parametrize("cls", [c for c in DM.classes if "get_all_records" in DM.classes[c].messages])
def test_every_setter_round_trips(world: tuple[SimServer, Any], cls: str) -> None:
    sim, x = world
    api = getattr(x, cls)
    ref = first_object(x, cls)
    assert ref is not None
    for msg in DM.classes[cls].messages.values():
        if msg.kind != "setter" or not is_implemented(msg) or msg.wire_name in HANDLERS:
            continue
        field = msg.name[4:]
        before = getattr(api, f"get_{field}")(ref)
        assert getattr(api, msg.name)(ref, before) == ""
        assert getattr(api, f"get_{field}")(ref) == before


def test_unimplemented_messages_say_so(world: tuple[SimServer, Any]) -> None:
    sim, x = world
    vm = x.VM.get_by_name_label("conformance")[0]
    assert not is_implemented(DM.message("VM.send_sysrq"))  # type: ignore[arg-type]
    assert failure(x.VM.send_sysrq, vm, "b") == ["INTERNAL_ERROR", "xapisim does not implement VM.send_sysrq"]


def _raised_codes() -> list[tuple[str, int | None, str]]:
    """Every errors.failure("CODE", ...) call in the simulator: (code, param count or None, where)."""
    out: list[tuple[str, int | None, str]] = []
    root = Path(xapisim.__file__).parent
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "failure" and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "errors" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                starred = any(isinstance(a, ast.Starred) for a in node.args[1:])
                out.append((str(node.args[0].value), None if starred else len(node.args) - 1,
                            f"{path.name}:{node.lineno}"))
    return out


RAISED = _raised_codes()


def test_simulator_raises_many_distinct_codes() -> None:
    assert len({c for c, _, _ in RAISED}) >= 40


@pytest.mark.parametrize("code,count,where", RAISED, ids=[f"{c}@{w}" for c, _, w in RAISED])
def test_raised_codes_are_real_with_right_arity(code: str, count: int | None, where: str) -> None:
    if code == "Fault":
        assert count == 1
        return
    cls = errors.error_class(code)
    assert code in DM.errors or code.startswith("SR_BACKEND_FAILURE_"), where
    if count is not None:
        assert count == cls.arity, f"{where}: {code} raised with {count} params, xapi uses {cls.arity}"


def test_error_classes_generated_for_every_code() -> None:
    for code, e in DM.errors.items():
        cls = errors.error_class(code)
        assert issubclass(cls, errors.XenAPIError) and cls.code == code and cls.arity == e.arity
    assert errors.failure("VM_BAD_POWER_STATE", "r", "halted", "running").description == [
        "VM_BAD_POWER_STATE", "r", "halted", "running"]
    wrong = errors.failure("VM_BAD_POWER_STATE", "r")
    assert wrong.code == "INTERNAL_ERROR"
    with pytest.raises(KeyError):
        errors.failure("NOT_A_REAL_CODE")


def test_async_variants_exist_exactly_for_async_messages(world: tuple[SimServer, Any]) -> None:
    sim, x = world
    vm = x.VM.get_by_name_label("halted")[0]
    assert DM.message("VM.get_possible_hosts").is_async  # type: ignore[union-attr]
    task = x.Async.VM.get_possible_hosts(vm)
    assert task.startswith("OpaqueRef:")
    assert failure(x.Async.VM.get_name_label, vm)[0] == "Fault"


def test_result_checker_catches_wrong_shapes() -> None:
    from xapisim import typecheck
    assert typecheck.problem("int", 5) is None
    assert typecheck.problem("int", "5") is not None
    assert typecheck.problem("bool", 1) is not None
    assert typecheck.problem("VM ref set", ["OpaqueRef:a", "x"]) is not None
    assert typecheck.problem("(string -> string) map", {"a": 1}) is not None
    assert typecheck.problem("enum vm_power_state", "running") is not None
    assert typecheck.problem("void", "") is None
