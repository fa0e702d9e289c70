"""The 2013 wire format: ETF bytes as Erlang writes them, and the daemon's compatibility port."""

from __future__ import annotations

import hashlib
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_helpers import make_series, node_config, pydicom_sample

from transfer import erl3d
from transfer.client import Credentials, scan, upload_files
from transfer.config import NodeAddr
from transfer.daemon import ServerThread
from transfer.errors import RemoteProtocolError

# term_to_binary(["a.dcm" | <<1,2,3>>]) in Erlang/OTP, byte for byte (ETF spec: version 131,
# LIST_EXT 108 with 1 element and a tail, STRING_EXT 107, BINARY_EXT 109).
IMPROPER = bytes([131, 108, 0, 0, 0, 1, 107, 0, 5]) + b"a.dcm" + bytes([109, 0, 0, 0, 3, 1, 2, 3])
# term_to_binary(["a.dcm", <<1,2,3>>]): a proper list ending in NIL_EXT 106.
PROPER = (
    bytes([131, 108, 0, 0, 0, 2, 107, 0, 5]) + b"a.dcm" + bytes([109, 0, 0, 0, 3, 1, 2, 3, 106])
)
# term_to_binary("a.dcm")
REPLY = bytes([131, 107, 0, 5]) + b"a.dcm"


def test_encode_matches_erlang_bytes() -> None:
    frame = erl3d.encode_request("a.dcm", b"\x01\x02\x03")
    assert frame == struct.pack(">I", len(IMPROPER)) + IMPROPER
    assert (
        erl3d.encode_reply(erl3d.encode_filename("a.dcm")) == struct.pack(">I", len(REPLY)) + REPLY
    )


@pytest.mark.parametrize("payload", [IMPROPER, PROPER])
def test_decode_both_list_shapes(payload: bytes) -> None:
    req = erl3d.decode_request(payload, max_size=1 << 20)
    assert (req.filename, req.data) == ("a.dcm", b"\x01\x02\x03")
    assert bytes([131]) + req.filename_term == REPLY


def test_decode_other_shapes() -> None:
    # Filename as a binary, data as a string (all bytes < 256): ["a" | "xyz"] = "axyz"? No:
    # [<<"a.dcm">> | <<...>>]
    p = bytes([131, 108, 0, 0, 0, 1, 109, 0, 0, 0, 5]) + b"a.dcm" + bytes([109, 0, 0, 0, 1, 9])
    assert erl3d.decode_request(p, max_size=100).data == b"\x09"
    # Data as a byte list: ["a.dcm", 1, 2] (proper list of small integers after the name)
    p = bytes([131, 108, 0, 0, 0, 3, 107, 0, 5]) + b"a.dcm" + bytes([97, 1, 97, 2, 106])
    assert erl3d.decode_request(p, max_size=100).data == b"\x01\x02"
    # Unicode file name: a list of code points.
    name = "снимок.dcm"
    p = bytes([131, 108, 0, 0, 0, 1]) + erl3d.encode_filename(name) + bytes([109, 0, 0, 0, 0])
    assert erl3d.decode_request(p, max_size=100).filename == name
    # term_to_binary(Term, [compressed]): tag 80, uncompressed size, zlib data.
    inner = IMPROPER[1:]
    comp = bytes([131, 80]) + struct.pack(">I", len(inner)) + zlib.compress(inner)
    assert erl3d.decode_request(comp, max_size=100).data == b"\x01\x02\x03"


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "version byte"),
        (b"\x83\x6a", "expected a list"),
        (IMPROPER[:-1], "truncated"),
        (IMPROPER + b"\x00", "trailing"),
        (bytes([131, 80, 0, 0, 1, 0]) + zlib.compress(b"x"), "wrong size"),
        (bytes([131, 80, 0xFF, 0, 0, 0]) + b"junk", "expands"),
        (bytes([131, 108, 0, 0, 0, 1, 100, 0, 1, 97, 106]), "unexpected term tag"),
    ],
)
def test_decode_rejects(payload: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        erl3d.decode_request(payload, max_size=1 << 20)


def test_reply_roundtrip() -> None:
    assert erl3d.decode_reply(REPLY) == (True, "a.dcm")
    ok, reason = erl3d.decode_reply(erl3d.encode_error("refused")[4:])
    assert not ok and reason == "refused"


@pytest.fixture
def erl_node(tmp_path: Path) -> Iterator[ServerThread]:
    cfg = node_config(tmp_path / "root", None, erl3d_port=0)
    # erl3d_port=0 means off; pick a free port for it.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    cfg.erl3d_port = s.getsockname()[1]
    s.close()
    with ServerThread(cfg) as srv:
        yield srv


def _erl_call(port: int, frame: bytes) -> tuple[bool, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(frame)
        head = _recv_exactly(s, 4)
        return erl3d.decode_reply(_recv_exactly(s, struct.unpack(">I", head)[0]))


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return buf


def test_daemon_erl3d_port_stores_and_refuses_escapes(
    erl_node: ServerThread, tmp_path: Path
) -> None:
    root = Path(erl_node.cfg.storage_root).resolve()
    data = pydicom_sample("CT_small.dcm").read_bytes()
    assert _erl_call(erl_node.erl3d_port, erl3d.encode_request("CT_small.dcm", data)) == (
        True,
        "CT_small.dcm",
    )
    stored = [p for p in root.rglob("*.dcm")]
    assert len(stored) == 1 and stored[0].read_bytes() == data
    for evil in [
        "../../escaped.dcm",
        "/tmp/abs.dcm",
        "d:/ErlangTest/x.dcm",
        "a\x00b.dcm",
        "..\\..\\x",
    ]:
        ok, reason = _erl_call(erl_node.erl3d_port, erl3d.encode_request(evil, b"payload"))
        assert not ok and "refused name" in reason, (evil, reason)
    assert not (tmp_path / "escaped.dcm").exists()
    # Non-DICOM payloads: the 2013 client cannot say "this is not DICOM", so they are refused.
    ok, reason = _erl_call(erl_node.erl3d_port, erl3d.encode_request("notes.txt", b"hello"))
    assert not ok and "not a valid DICOM file" in reason
    assert not (root / "objects").exists()
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.resolve().parents]
    assert outside == []
    # Garbage and oversize frames get an error and the port keeps serving.
    ok, reason = _erl_call(erl_node.erl3d_port, struct.pack(">I", 4) + b"junk")
    assert not ok and "external term" in reason
    ok, reason = _erl_call(erl_node.erl3d_port, struct.pack(">I", 1 << 30))
    assert not ok and "exceeds" in reason
    assert _erl_call(erl_node.erl3d_port, erl3d.encode_request("CT_small.dcm", data)) == (
        True,
        "CT_small.dcm",
    )


def test_uploader_speaks_erl3d(erl_node: ServerThread, tmp_path: Path) -> None:
    import asyncio

    make_series(tmp_path / "series", 6, seed=3)
    sc = scan(tmp_path / "series")
    rep = asyncio.run(
        upload_files(
            sc.files,
            [NodeAddr("127.0.0.1", erl_node.erl3d_port)],
            Credentials.plaintext(),
            protocol="erl3d",
        )
    )
    assert rep.ok, rep.failed
    assert rep.as_dict()["total"]["files"] == 6
    ph = rep.phases()
    assert 0 < ph["first_file_s"] < ph["last_ack_s"] <= rep.seconds
    assert erl_node.server is not None and erl_node.server.store.summary()["instances"] == 6


def test_erl3d_allow_other_keeps_non_dicom_by_content_hash(tmp_path: Path) -> None:
    cfg = node_config(tmp_path / "root", None, erl3d_allow_other=True)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    cfg.erl3d_port = s.getsockname()[1]
    s.close()
    with ServerThread(cfg) as srv:
        root = Path(cfg.storage_root).resolve()
        assert _erl_call(srv.erl3d_port, erl3d.encode_request("dir/notes.txt", b"hello")) == (
            True,
            "dir/notes.txt",
        )
        sha = hashlib.sha256(b"hello").hexdigest()
        # Kept by content hash, never under the client's name.
        assert (root / "objects" / sha[:2] / sha).read_bytes() == b"hello"
        assert not (root / "dir").exists()


def test_erl3d_truncated_and_idle_connections_leave_nothing_and_do_not_block(
    tmp_path: Path,
) -> None:
    cfg = node_config(tmp_path / "root", None, idle_timeout=0.5)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    cfg.erl3d_port = s.getsockname()[1]
    s.close()
    data = pydicom_sample("CT_small.dcm").read_bytes()
    frame = erl3d.encode_request("CT_small.dcm", data)
    with ServerThread(cfg) as srv:
        root = Path(cfg.storage_root)
        idle = socket.create_connection(("127.0.0.1", srv.erl3d_port), timeout=10)
        # A frame cut short (length prefix says more than arrives), then a close.
        with socket.create_connection(("127.0.0.1", srv.erl3d_port), timeout=10) as cut:
            cut.sendall(frame[: len(frame) // 2])
        # A frame cut short, then silence: dropped after the idle timeout.
        stall = socket.create_connection(("127.0.0.1", srv.erl3d_port), timeout=10)
        stall.sendall(frame[:100])
        # Meanwhile another client is served.
        assert _erl_call(srv.erl3d_port, erl3d.encode_request("x.dcm", data)) == (True, "x.dcm")
        t0 = time.monotonic()
        for sock in (idle, stall):
            assert sock.recv(100) == b""  # closed by the node, no reply
            sock.close()
        assert time.monotonic() - t0 < 8
        stored = [p for p in root.rglob("*") if p.is_file() and ".medstream" not in p.parts]
        assert [p.read_bytes() for p in stored] == [data]  # only the complete one
