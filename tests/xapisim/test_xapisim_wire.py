"""The wire format as xapi writes it, read both raw and through the real XenAPI SDK."""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import ssl
import time
import xmlrpc.client

import pytest
import XenAPI
from xsim_helpers import failure

from xapisim import SimConfig, SimServer


def raw_call(sim: SimServer, host: str, method: str, *params: object, path: str = "/") -> str:
    addr = sim.host(host).address
    conn = http.client.HTTPSConnection(addr, sim.port, context=sim.ssl_context(), timeout=10)
    body = xmlrpc.client.dumps(tuple(params), method, allow_none=True)
    conn.request("POST", path, body, {"Content-Type": "text/xml"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200, text
    return text


def test_envelope_ints_untagged_booleans_tagged_datetimes_xapi_format(sim: SimServer) -> None:
    text = raw_call(sim, "host-1", "session.login_with_password", sim.username, sim.password)
    session = re.search(r"<name>Value</name><value>(OpaqueRef:[0-9a-f-]+)</value>", text)
    assert session, text
    ref = session.group(1)
    text = raw_call(sim, "host-1", "VM.get_all_records", ref)
    assert "<member><name>Status</name><value>Success</value></member>" in text
    assert re.search(r"<name>memory_static_max</name><value>\d+</value>", text)
    assert re.search(r"<name>is_a_template</name><value><boolean>[01]</boolean></value>", text)
    assert re.search(r"<name>snapshot_time</name><value><dateTime.iso8601>19700101T00:00:00Z"
                     r"</dateTime.iso8601></value>", text)
    assert "<name>suspend_VDI</name><value>OpaqueRef:NULL</value>" in text
    assert "<i4>" not in text and "<int>" not in text and "<string>" not in text
    # the same call on /RPC2
    assert "Success" in raw_call(sim, "host-1", "VM.get_all", ref, path="/RPC2")
    # void is the empty string
    text = raw_call(sim, "host-1", "session.logout", ref)
    assert "<name>Value</name><value></value>" in text


def test_sdk_reads_ints_as_strings_and_refs_as_opaque(xapi: object) -> None:
    x = xapi
    host = x.host.get_all()[0]  # type: ignore[attr-defined]
    rec = x.host.get_record(host)  # type: ignore[attr-defined]
    assert rec["API_version_major"] == "2" and isinstance(rec["API_version_minor"], str)
    assert rec["enabled"] is True
    assert rec["metrics"].startswith("OpaqueRef:")
    free = x.host.compute_free_memory(host)  # type: ignore[attr-defined]
    assert isinstance(free, str) and int(free) > 0


def test_dispatch_errors(sim: SimServer, xapi: object) -> None:
    x = xapi
    vm = x.VM.get_by_name_label("CentOS 7")[0]  # type: ignore[attr-defined]
    assert failure(x.VM.no_such_call, vm) == ["MESSAGE_METHOD_UNKNOWN", "VM.no_such_call"]  # type: ignore[attr-defined]
    assert failure(x.VM.start, vm) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.start", "3", "1"]  # type: ignore[attr-defined]
    assert failure(x.VM.get_record, "OpaqueRef:nope") == ["HANDLE_INVALID", "VM", "OpaqueRef:nope"]  # type: ignore[attr-defined]
    assert failure(x.VM.get_by_uuid, "nope") == ["UUID_INVALID", "VM", "nope"]  # type: ignore[attr-defined]
    assert failure(x.Async.VM.get_record, vm) == [  # type: ignore[attr-defined]
        "Fault", "No async mode for this operation (rpc: VM.get_record)"]
    # setters exist only for RW fields
    assert failure(x.VM.set_power_state, vm, "Running")[0] == "MESSAGE_METHOD_UNKNOWN"  # type: ignore[attr-defined]
    assert failure(x.Async.VM.no_such_call, vm) == ["MESSAGE_METHOD_UNKNOWN", "VM.no_such_call"]  # type: ignore[attr-defined]
    # a bad session: the raw answer (the SDK would silently re-login)
    text = raw_call(sim, "host-1", "VM.get_all", "OpaqueRef:bogus")
    assert "SESSION_INVALID" in text and "OpaqueRef:bogus" in text
    # unknown method with a bad session: the session is checked first
    text = raw_call(sim, "host-1", "VM.frobnicate", "OpaqueRef:bogus")
    assert "SESSION_INVALID" in text
    # arity is checked before the session, and so is the unmarshalling of the arguments
    text = raw_call(sim, "host-1", "VM.start", "OpaqueRef:bogus")
    assert "MESSAGE_PARAMETER_COUNT_MISMATCH" in text
    text = raw_call(sim, "host-1", "VM.start", "OpaqueRef:bogus", "OpaqueRef:vm", "no", False)
    assert "FIELD_TYPE_ERROR" in text and "start_paused" in text


def test_login_optional_params_and_bad_credentials(sim: SimServer) -> None:
    s = sim.session("host-1", login=False)
    s.xenapi.login_with_password(sim.username, sim.password)  # version/originator are optional
    s.xenapi.session.logout()
    s = sim.session("host-1", login=False)
    details = failure(s.xenapi.login_with_password, "root", "wrong", "2.21", "test")
    assert details == ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"]


def test_tls_verifies_against_the_ca_and_fingerprints_match(
        sim: SimServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    s = sim.session("host-2")
    assert s.xenapi.pool.get_all()
    # a default context (system CAs only) refuses the simulator's certificate
    bad = XenAPI.Session(sim.url_for("host-2"), transport=xmlrpc.client.SafeTransport(
        context=ssl.create_default_context()))
    caplog.set_level(logging.INFO, logger="xapisim")
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            bad.xenapi.login_with_password(sim.username, sim.password, "", "")
    finally:
        bad("close")()
    # the server logs the refused handshake (in its handler thread); no traceback on stderr
    for _ in range(100):
        if any("ended" in r.getMessage() for r in caplog.records):
            break
        time.sleep(0.02)
    assert any("connection from" in r.getMessage() for r in caplog.records), caplog.text
    assert "Traceback" not in capfd.readouterr().err
    der = ssl.get_server_certificate((sim.host("host-2").address, sim.port))
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(der)).hexdigest().upper()
    assert sim.fingerprints["host-2"].replace(":", "") == digest


def test_http_errors(sim: SimServer) -> None:
    conn = http.client.HTTPSConnection(sim.host("host-1").address, sim.port,
                                       context=sim.ssl_context(), timeout=10)
    conn.request("POST", "/", b"<not-xml", {"Content-Type": "text/xml"})
    resp = conn.getresponse()
    assert resp.status == 500 and b"<html>" in resp.read()
    conn.request("GET", "/nothing")
    resp = conn.getresponse()
    assert resp.status == 404
    resp.read()
    conn.close()


def test_plain_http_when_tls_off() -> None:
    with SimServer(SimConfig(hosts=1, tls=False, sync_interval=0)) as sim:
        assert sim.url_for("host-1").startswith("http://")
        s = sim.session()
        assert len(s.xenapi.host.get_all()) == 1


def test_get_all_records_where(xapi: object) -> None:
    x = xapi
    templates = x.VM.get_all_records_where('field "is_a_template" = "true"')  # type: ignore[attr-defined]
    assert templates and all(r["is_a_template"] for r in templates.values())
    both = x.VM.get_all_where(  # type: ignore[attr-defined]
        'field "is_a_template" = "false" and not (field "power_state" = "Halted")')
    assert [x.VM.get_is_control_domain(v) for v in both] == [True]  # type: ignore[attr-defined]
    assert failure(x.VM.get_all_where, 'field "x" ==')[0] == "INVALID_VALUE"  # type: ignore[attr-defined]


def test_map_and_set_accessors(xapi: object) -> None:
    x = xapi
    vm = x.VM.get_by_name_label("CentOS 7")[0]  # type: ignore[attr-defined]
    clone = x.VM.clone(vm, "maps")  # type: ignore[attr-defined]
    x.VM.add_to_xenstore_data(clone, "vm-data/hostname", "n1")  # type: ignore[attr-defined]
    uuid = x.VM.get_uuid(clone)  # type: ignore[attr-defined]
    assert failure(x.VM.add_to_xenstore_data, clone, "vm-data/hostname", "n2") == [  # type: ignore[attr-defined]
        "MAP_DUPLICATE_KEY", "VM", "xenstore_data", uuid, "vm-data/hostname"]
    x.VM.remove_from_xenstore_data(clone, "vm-data/hostname")  # type: ignore[attr-defined]
    assert x.VM.get_xenstore_data(clone) == {}  # type: ignore[attr-defined]
    x.VM.add_tags(clone, "medstream")  # type: ignore[attr-defined]
    x.VM.add_tags(clone, "medstream")  # type: ignore[attr-defined]
    assert x.VM.get_tags(clone) == ["medstream"]  # type: ignore[attr-defined]
    x.VM.remove_tags(clone, "medstream")  # type: ignore[attr-defined]
    assert x.VM.get_tags(clone) == []  # type: ignore[attr-defined]
    x.VM.set_name_description(clone, "d")  # type: ignore[attr-defined]
    assert x.VM.get_name_description(clone) == "d"  # type: ignore[attr-defined]
    # bool params must be real booleans
    assert failure(x.VM.set_ha_always_run, clone, "true")[0] == "FIELD_TYPE_ERROR"  # type: ignore[attr-defined]


def jsonrpc(sim: SimServer, payload: dict[str, object]) -> dict[str, object]:
    import json
    conn = http.client.HTTPSConnection(sim.host("host-1").address, sim.port,
                                       context=sim.ssl_context(), timeout=10)
    conn.request("POST", "/jsonrpc", json.dumps(payload), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data: dict[str, object] = json.loads(resp.read())
    conn.close()
    return data


def test_jsonrpc_v1_and_v2_share_sessions_with_xmlrpc(sim: SimServer) -> None:
    login = jsonrpc(sim, {"method": "session.login_with_password",
                          "params": [sim.username, sim.password, "2.21", "t"], "id": 1})
    assert login["error"] is None and login["id"] == 1
    ref = login["result"]
    host = jsonrpc(sim, {"method": "host.get_all", "params": [ref], "id": 2})["result"]
    assert isinstance(host, list)
    rec = jsonrpc(sim, {"jsonrpc": "2.0", "method": "host.get_record", "params": [ref, host[0]], "id": 3})
    result = rec["result"]
    assert isinstance(result, dict) and isinstance(result["API_version_major"], int)  # numbers on JSON
    bad = jsonrpc(sim, {"jsonrpc": "2.0", "method": "VM.get_record", "params": [ref, "OpaqueRef:x"], "id": 4})
    assert bad["error"] == {"code": 1, "message": "HANDLE_INVALID", "data": ["VM", "OpaqueRef:x"]}
    v1 = jsonrpc(sim, {"method": "VM.get_record", "params": [ref, "OpaqueRef:x"], "id": 5})
    assert v1["result"] is None and v1["error"] == ["HANDLE_INVALID", "VM", "OpaqueRef:x"]


def test_import_raw_vdi_put(sim: SimServer) -> None:
    s = sim.session("host-1")
    x = s.xenapi
    sr = x.SR.get_by_name_label("Local storage")[0]
    vdi = x.VDI.create({"SR": sr, "virtual_size": str(10 * 1024 * 1024), "type": "user",
                        "sharable": False, "read_only": False, "other_config": {},
                        "name_label": "config-drive"})
    payload = b"cidata" * 1000

    def put(query: str, body: bytes) -> int:
        conn = http.client.HTTPSConnection(sim.host("host-1").address, sim.port,
                                           context=sim.ssl_context(), timeout=10)
        conn.request("PUT", f"/import_raw_vdi?{query}", body)
        status = conn.getresponse().status
        conn.close()
        return status

    assert put(f"vdi={vdi}&format=raw&session_id={s.handle}", payload) == 200
    assert sim.vdi_file(x.VDI.get_uuid(vdi)).read_bytes() == payload
    assert put(f"vdi={vdi}&format=raw&session_id=OpaqueRef:bad", payload) == 403
    assert put(f"vdi=OpaqueRef:nope&format=raw&session_id={s.handle}", payload) == 404


def test_sdk_relogin_on_session_invalid_and_api_version(sim: SimServer) -> None:
    s = sim.session("host-1")
    assert s.API_version == "2.21"  # pool.get_all -> pool.get_master -> host.get_API_version_*
    old = s.handle
    other = sim.session("host-1")
    getattr(other, "session.logout")(old)  # the server forgets s's session behind its back
    assert s.xenapi.VM.get_all()  # SESSION_INVALID -> the SDK logs in again and retries
    assert s.handle != old


def test_sessions_are_capped_per_originator(sim: SimServer) -> None:
    from xapisim.models import SESSION_LIMIT
    s = sim.session("host-1", login=False)
    login = getattr(s, "session.login_with_password")
    first = login(sim.username, sim.password, "", "leaky")["Value"]
    for _ in range(SESSION_LIMIT):
        login(sim.username, sim.password, "", "leaky")
    assert getattr(s, "VM.get_all")(first)["ErrorDescription"] == ["SESSION_INVALID", first]
    with sim.model.lock:
        db = sim.model.nodes["host-1"].db
        assert db is not None
        assert len(db.find("session", originator="leaky")) == SESSION_LIMIT
