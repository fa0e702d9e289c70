"""XML-RPC as xapi writes it (mirage/ocaml-rpc's non-strict writer).

Strings, ints (64-bit), refs and enums travel *untagged* (``<value>42</value>``), so Python's
``xmlrpc.client`` reads every int as ``str``; booleans are ``<boolean>``, floats ``<double>``,
datetimes ``<dateTime.iso8601>20240101T13:20:11Z</dateTime.iso8601>``. ``Int32`` is the one
exception (``event.from``'s ``valid_ref_counts``), written as ``<i4>``.
"""

from __future__ import annotations

import datetime as dt
import xmlrpc.client
from typing import Any
from xml.sax.saxutils import escape

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class Int32(int):
    """An int that goes on the wire as ``<i4>`` (Rpc.Int32)."""


def format_datetime(value: dt.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC)
    return value.strftime("%Y%m%dT%H:%M:%SZ")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def value_xml(value: Any) -> str:
    """One ``<value>...</value>`` element."""
    if isinstance(value, bool):
        return f"<value><boolean>{1 if value else 0}</boolean></value>"
    if isinstance(value, Int32):
        return f"<value><i4>{int(value)}</i4></value>"
    if isinstance(value, int):
        return f"<value>{value}</value>"
    if isinstance(value, float):
        return f"<value><double>{value!r}</double></value>"
    if isinstance(value, str):
        return f"<value>{escape(value)}</value>"
    if isinstance(value, dt.datetime):
        return f"<value><dateTime.iso8601>{format_datetime(value)}</dateTime.iso8601></value>"
    if isinstance(value, dict):
        members = "".join(
            f"<member><name>{escape(str(k))}</name>{value_xml(v)}</member>" for k, v in value.items()
        )
        return f"<value><struct>{members}</struct></value>"
    if isinstance(value, list | tuple | set | frozenset):
        return f"<value><array><data>{''.join(value_xml(v) for v in value)}</data></array></value>"
    if value is None:
        return "<value></value>"
    raise TypeError(f"cannot marshal {type(value).__name__}")


def response_xml(value: dict[str, Any]) -> bytes:
    body = (
        "<?xml version='1.0'?>\n<methodResponse><params><param>"
        f"{value_xml(value)}</param></params></methodResponse>\n"
    )
    return body.encode("utf-8")


def success(value: Any) -> dict[str, Any]:
    return {"Status": "Success", "Value": value}


def failure(description: list[str]) -> dict[str, Any]:
    return {"Status": "Failure", "ErrorDescription": list(description)}


def task_result(value: Any) -> str:
    """What ``task.result`` holds: the XML-RPC encoding of the return value (Xmlrpc.to_string)."""
    if value is None or value == "":
        return "<value></value>"
    return value_xml(value)


def parse_request(body: bytes) -> tuple[str, tuple[Any, ...]]:
    params, method = xmlrpc.client.loads(body, use_datetime=False, use_builtin_types=False)
    if method is None:
        raise ValueError("not a methodCall")
    return method, params


def to_json(value: Any) -> Any:
    """JSON-RPC encoding (api_server.ml jsoncallback): ints are numbers, datetimes strings."""
    if isinstance(value, dt.datetime):
        return format_datetime(value)
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return int(value) if isinstance(value, Int32) else value
    raise TypeError(f"cannot encode {type(value).__name__}")


def jsonrpc_response(envelope: dict[str, Any], request_id: Any, version2: bool) -> dict[str, Any]:
    ok = envelope["Status"] == "Success"
    if version2:
        if ok:
            return {"jsonrpc": "2.0", "result": to_json(envelope["Value"]), "id": request_id}
        desc = envelope["ErrorDescription"]
        return {"jsonrpc": "2.0", "error": {"code": 1, "message": desc[0], "data": desc[1:]},
                "id": request_id}
    if ok:
        return {"result": to_json(envelope["Value"]), "error": None, "id": request_id}
    return {"result": None, "error": list(envelope["ErrorDescription"]), "id": request_id}
