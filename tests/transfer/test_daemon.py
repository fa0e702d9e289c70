"""The daemon and the uploader over real loopback sockets (TLS unless a test says otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from transfer_helpers import copy_testfile, make_series, node_config, pydicom_sample, write_ct

from transfer.client import (
    Credentials,
    NodeSession,
    assign,
    client_ssl_context,
    connections_for,
    fetch,
    scan,
    upload_dir,
    upload_files,
)
from transfer.config import DaemonConfig, NodeAddr
from transfer.daemon import ServerThread, server_ssl_context
from transfer.dicominfo import inspect_path
from transfer.errors import AuthError, NodeError
from transfer.protocol import (
    NEED_DATA,
    Ack,
    Connection,
    ConnectionClosed,
    Data,
    EndOfBody,
    Error,
    Event,
    FileHeader,
    FrameType,
    Hello,
    Role,
    Welcome,
)

SAMPLES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "ExplVR_BigEnd.dcm",
    "image_dfl.dcm",
    "JPEG2000.dcm",
    "rtplan.dcm",
    "waveform_ecg.dcm",
    "liver_1frame.dcm",
    "SC_rgb_rle_2frame.dcm",
]
BROKEN = ["MR_truncated.dcm", "rtplan_truncated.dcm", "no_meta.dcm"]


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".medstream" not in p.parts
    }


def two_nodes(tmp_path: Path, pki_dir: Path, **kw: object) -> tuple[ServerThread, ServerThread]:
    a = ServerThread(node_config(tmp_path / "n1", pki_dir, node_name="n1", **kw)).start()
    b = ServerThread(node_config(tmp_path / "n2", pki_dir, node_name="n2", **kw)).start()
    return a, b


def test_pydicom_samples_round_trip_byte_identical(
    tmp_path: Path, pki_dir: Path, creds: Credentials
) -> None:
    src = tmp_path / "study"
    for name in SAMPLES + BROKEN:
        copy_testfile(name, src / ("sub" if name.startswith("MR") else ""))
    copy_testfile("MR_small_bigendian.dcm", src / "z")  # same SOP Instance UID as MR_small
    a, b = two_nodes(tmp_path, pki_dir)
    try:
        nodes = [NodeAddr("127.0.0.1", a.port, "n1"), NodeAddr("127.0.0.1", b.port, "n2")]
        rep = upload_dir(src, nodes, creds, replicas=2)
        d = rep.as_dict()
        assert not rep.ok  # the broken ones were rejected...
        rejected = {r["name"].split("/")[-1]: r["reason"] for r in d["rejected"]}
        assert sorted(rejected) == sorted([*BROKEN, "MR_small_bigendian.dcm"])
        assert "duplicate SOP Instance UID" in rejected["MR_small_bigendian.dcm"]
        assert "truncated" in rejected["MR_truncated.dcm"]
        assert "DICM" in rejected["no_meta.dcm"]
        assert d["failed"] == []  # ...and everything else stored, on both replicas
        assert d["total"]["files"] == 2 * len(SAMPLES)
        assert [n["files"] for n in d["nodes"]] == [len(SAMPLES), len(SAMPLES)]
        for n in d["nodes"]:
            assert n["bytes"] > 0 and n["seconds"] > 0 and n["mb_per_s"] > 0
        # Retrieval: byte-identical, at <study>/<series>/<sop>.dcm
        out = tmp_path / "out"
        got = asyncio.run(fetch(nodes, creds, out))
        assert len(got) == len(SAMPLES)
        originals = {hashlib.sha256(pydicom_sample(n).read_bytes()).hexdigest() for n in SAMPLES}
        assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in got} == originals
        # Resume: a re-run sends nothing.
        again = upload_dir(src, nodes, creds, replicas=2).as_dict()
        assert again["total"]["already"] == 2 * len(SAMPLES) and again["total"]["bytes"] == 0
        assert all(n["wire_bytes"] == 0 for n in again["nodes"])
    finally:
        a.stop()
        b.stop()


def test_placement_spreads_and_zstd(tmp_path: Path, pki_dir: Path, creds: Credentials) -> None:
    make_series(tmp_path / "s", 40, rows=64, cols=64, seed=1)
    a, b = two_nodes(tmp_path, pki_dir)
    try:
        nodes = [NodeAddr("127.0.0.1", a.port, "n1"), NodeAddr("127.0.0.1", b.port, "n2")]
        d = upload_dir(
            tmp_path / "s", nodes, creds, compression="zstd", connections_per_node=3
        ).as_dict()
        assert d["ok"], d["failed"]
        counts = [n["files"] for n in d["nodes"]]
        assert sum(counts) == 40 and min(counts) >= 10  # rendezvous hashing spreads
        assert all(n["wire_bytes"] < n["bytes"] for n in d["nodes"])  # 12-bit noise compresses
        # Several connections per node: 3 upload sessions, and the resume check rides on one.
        for srv in (a, b):
            assert srv.server is not None and srv.server.served == 3
            assert srv.server.peak_active >= 2
        stored = {**files_under(tmp_path / "n1"), **files_under(tmp_path / "n2")}
        assert sorted(hashlib.sha256(v).hexdigest() for v in stored.values()) == sorted(
            hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "s").iterdir()
        )
    finally:
        a.stop()
        b.stop()


def test_connections_are_capped_across_nodes(
    tmp_path: Path, pki_dir: Path, creds: Credentials
) -> None:
    assert [connections_for(n, 4, 16) for n in (1, 2, 4, 5, 8, 16, 30)] == [4, 4, 4, 3, 2, 1, 1]
    assert connections_for(3, 64, 1024) == 64  # an explicit --connections within the cap
    make_series(tmp_path / "s", 12, rows=32, cols=32, seed=2)
    a, b = two_nodes(tmp_path, pki_dir)
    try:
        nodes = [NodeAddr("127.0.0.1", a.port, "n1"), NodeAddr("127.0.0.1", b.port, "n2")]
        d = upload_dir(
            tmp_path / "s", nodes, creds, connections_per_node=4, max_connections=2, resume=False
        ).as_dict()
        assert d["ok"], d["failed"]
        assert d["connections_per_node"] == 1
        for srv in (a, b):  # one upload session each, no resume check
            assert srv.server is not None and srv.server.served == 1
    finally:
        a.stop()
        b.stop()


def test_a_finished_node_hands_its_connection_to_the_busiest(
    tmp_path: Path, pki_dir: Path, creds: Credentials
) -> None:
    # One connection per node; n2 gets one file, n1 sixty (18 MB). When n2 is done,
    # its connection goes to n1, which then uploads over two.
    make_series(tmp_path / "s", 150, rows=384, cols=384, seed=5)
    sc = scan(tmp_path / "s")
    a, b = two_nodes(tmp_path, pki_dir)
    try:
        nodes = [NodeAddr("127.0.0.1", a.port, "n1"), NodeAddr("127.0.0.1", b.port, "n2")]
        plan = assign(sc.files, nodes, 1)
        files = plan[nodes[0]][:60] + plan[nodes[1]][:1]
        d = asyncio.run(
            upload_files(files, nodes, creds, connections_per_node=1, resume=False)
        ).as_dict()
        assert d["ok"], d["failed"]
        n1, n2 = d["nodes"]
        assert (n1["files"], n2["files"]) == (60, 1)
        assert n2["connections"] == 1 and n1["connections"] == 2
        assert a.server is not None and a.server.served == 2
        assert b.server is not None and b.server.served == 1
    finally:
        a.stop()
        b.stop()


def test_a_connection_takes_a_file_only_when_it_can_send_it_soon(
    node: tuple[ServerThread, NodeAddr],
    creds: Credentials,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A connection commits to no more than it can send soon (COMMIT_HORIZON at the rate it has
    # achieved, at least COMMIT_MIN), so that the rest stays in the node's queue for whichever
    # connection frees up first, or is handed over. With the floor at one byte and no horizon,
    # one file at a time: each FILE goes out only after the previous one's ACK. Without the
    # bound, the window (WINDOW files) lets the headers run ahead of the acks.
    import transfer.client as client

    monkeypatch.setattr(client, "COMMIT_MIN", 1)
    monkeypatch.setattr(client, "COMMIT_HORIZON", 0.0)
    events: list[str] = []
    send_header, done = client._Uploader._send_header, client._Uploader._done

    def header(self: client._Uploader, *a: Any) -> None:
        events.append("FILE")
        send_header(self, *a)

    def acked(self: client._Uploader, *a: Any) -> None:
        events.append("ACK")
        done(self, *a)

    monkeypatch.setattr(client._Uploader, "_send_header", header)
    monkeypatch.setattr(client._Uploader, "_done", acked)
    make_series(tmp_path / "s", 8, rows=64, cols=64, seed=6)
    _, addr = node
    d = upload_dir(tmp_path / "s", [addr], creds, connections_per_node=1, resume=False)
    assert d.ok, d.failed
    assert events == ["FILE", "ACK"] * 8


def test_wrong_token_wrong_ca_and_plaintext_are_refused(
    node: tuple[ServerThread, NodeAddr], pki_dir: Path, tmp_path: Path
) -> None:
    _, addr = node
    bad = Credentials(client_ssl_context(str(pki_dir / "ca.crt")), "not-the-token-at-all")
    with pytest.raises(AuthError, match="wrong token"):
        asyncio.run(NodeSession(addr, bad).open())
    from transfer import pki

    other = tmp_path / "otherca"
    pki.init_ca(other)
    with pytest.raises(AuthError, match="certificate"):
        asyncio.run(
            NodeSession(addr, Credentials(client_ssl_context(str(other / "ca.crt")), "x")).open()
        )
    with pytest.raises(NodeError, match="expect TLS"):
        asyncio.run(NodeSession(addr, Credentials.plaintext()).open(timeout=5))
    make_series(tmp_path / "s", 2)
    d = upload_dir(tmp_path / "s", [addr], bad).as_dict()
    assert not d["ok"] and all("wrong token" in f["reason"] for f in d["failed"])
    # Refused clients do not disturb the node: the right token still works.
    good = Credentials(
        client_ssl_context(str(pki_dir / "ca.crt")), (pki_dir / "token").read_text().strip()
    )
    assert upload_dir(tmp_path / "s", [addr], good).ok


def test_mutual_tls(tmp_path: Path, pki_dir: Path) -> None:
    cfg = node_config(tmp_path / "root", pki_dir, client_ca=str(pki_dir / "ca.crt"))
    token = (pki_dir / "token").read_text().strip()
    with ServerThread(cfg) as srv:
        addr = NodeAddr("127.0.0.1", srv.port)
        no_cert = Credentials(client_ssl_context(str(pki_dir / "ca.crt")), token)
        with pytest.raises((NodeError, AuthError)):
            asyncio.run(_ping(addr, no_cert))
        with_cert = Credentials(
            client_ssl_context(
                str(pki_dir / "ca.crt"),
                str(pki_dir / "workstation.crt"),
                str(pki_dir / "workstation.key"),
            ),
            token,
        )
        assert asyncio.run(_ping(addr, with_cert))["instances"] == 0


def test_the_node_sends_no_session_tickets(
    node: tuple[ServerThread, NodeAddr], creds: Credentials
) -> None:
    """Clients never resume a TLS session, so the node issues no tickets (each would cost
    bytes and an encryption on every connection)."""
    _, addr = node

    async def main() -> tuple[str, bool]:
        async with NodeSession(addr, creds) as s:
            await s.call("ping")  # the client has read past any post-handshake message
            assert s.writer is not None
            tls = s.writer.get_extra_info("ssl_object")
            return tls.version(), tls.session.has_ticket

    version, has_ticket = asyncio.run(main())
    assert version == "TLSv1.3" and not has_ticket


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
def test_the_client_hello_is_small_and_tls12_nodes_still_answer(pki_dir: Path, version: str) -> None:
    """Without TLS 1.3's middlebox compatibility mode the client's ClientHello stays under 256
    bytes, where OpenSSL would pad it to 512 (measured: 235 against 517); a node limited to
    TLS 1.2 still completes the handshake."""
    sctx = server_ssl_context(
        DaemonConfig(tls_cert=str(pki_dir / "node.crt"), tls_key=str(pki_dir / "node.key"))
    )
    sctx.maximum_version = getattr(ssl.TLSVersion, version)
    cctx = client_ssl_context(str(pki_dir / "ca.crt"))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = cctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    srv = sctx.wrap_bio(s_in, s_out, server_side=True)
    flights: list[int] = []
    done = [False, False]
    for _ in range(10):  # a handshake takes 2 or 3 flights each way
        for i, (end, out, peer_in) in enumerate(((c, c_out, s_in), (srv, s_out, c_in))):
            if not done[i]:
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
                    done[i] = True
            data = out.read()
            if i == 0:
                flights.append(len(data))
            peer_in.write(data)
        if all(done):
            break
    assert all(done) and c.version() == version.replace("_", ".")
    assert flights[0] < 256, flights


async def _ping(addr: NodeAddr, creds: Credentials) -> dict[str, object]:
    async with NodeSession(addr, creds) as s:
        result: dict[str, object] = await s.call("ping")
        return result


# ---------------------------------------------------------------------------- raw frames


class Raw:
    """A blocking client socket speaking frames by hand, for fault tests."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.sock: socket.socket = (
            ctx.wrap_socket(sock, server_hostname="127.0.0.1") if ctx else sock
        )
        self.conn = Connection(Role.CLIENT)

    def hello(self, token: str = "") -> Event:
        self.send(Hello(token=token))
        return self.event()

    def send(self, ev: Event) -> None:
        self.sock.sendall(self.conn.send(ev))

    def event(self) -> Event:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                assert isinstance(ev, Event)
                return ev
            self.conn.receive_data(self.sock.recv(65536))

    def close(self) -> None:
        self.sock.close()


def sop_header(i: int, data: bytes, **kw: object) -> FileHeader:
    base: dict[str, object] = dict(
        file_id=i,
        name=f"x{i}.dcm",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        kind="other",
        sop_uid="",
        study_uid="",
        series_uid="",
    )
    base.update(kw)
    return FileHeader(**base)  # type: ignore[arg-type]


def still_serves(port: int) -> None:
    r = Raw(port)
    assert isinstance(r.hello(), Welcome)
    data = b"still here %f" % time.time()
    r.send(sop_header(0, data))
    r.send(Data(data))
    r.send(EndOfBody())
    ack = r.event()
    assert isinstance(ack, Ack) and ack.status == "stored", ack
    r.close()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "protocol"),
        (struct.pack(">BI", FrameType.DATA, 1 << 30), "frame-too-large"),
        (struct.pack(">BI", FrameType.HELLO, 3) + b"{{{", "protocol"),
    ],
)
def test_garbage_and_oversize_frames_get_an_error_and_the_node_keeps_serving(
    plain_node: tuple[ServerThread, NodeAddr], raw: bytes, code: str
) -> None:
    srv, _ = plain_node
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(raw)
    conn = Connection(Role.CLIENT)
    conn.send(Hello())  # so the client side accepts an ERROR frame
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    conn.receive_data(got)
    ev = conn.next_event()
    assert isinstance(ev, Error) and ev.code == code, ev
    still_serves(srv.port)


def test_truncated_frames_leave_nothing_partial(
    plain_node: tuple[ServerThread, NodeAddr], tmp_path: Path
) -> None:
    srv, _ = plain_node
    root = Path(srv.cfg.storage_root)
    data = b"z" * 300000
    r = Raw(srv.port)
    assert isinstance(r.hello(), Welcome)
    r.send(sop_header(0, data))
    r.sock.sendall(r.conn.send(Data(data[:200000]))[:150000])  # a DATA frame cut short
    r.close()
    deadline = time.monotonic() + 10
    while srv.server is not None and srv.server.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert files_under(root) == {}
    assert not list(root.rglob(".tmp-*"))
    still_serves(srv.port)


def test_bad_names_and_uids_in_headers_are_refused_per_file(
    plain_node: tuple[ServerThread, NodeAddr], tmp_path: Path
) -> None:
    srv, _ = plain_node
    root = Path(srv.cfg.storage_root).resolve()
    r = Raw(srv.port)
    assert isinstance(r.hello(), Welcome)
    evil = ["../../../escaped", "/etc/passwd", "a\x00b", "C:\\x"]
    for i, name in enumerate(evil):
        r.send(sop_header(i, b"data", name=name))
        r.send(Data(b"data"))
        r.send(EndOfBody())
    ct = pydicom_sample("CT_small.dcm").read_bytes()
    # A DICOM file whose header claims UIDs the file does not have.
    r.send(sop_header(9, ct, kind="dicom", study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4"))
    r.send(Data(ct))
    r.send(EndOfBody())
    # A file declared DICOM that is not.
    r.send(
        sop_header(
            10, b"not dicom", kind="dicom", study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.5"
        )
    )
    r.send(Data(b"not dicom"))
    r.send(EndOfBody())
    acks = [r.event() for _ in range(len(evil) + 2)]
    r.close()
    assert all(isinstance(a, Ack) and a.status == "error" for a in acks)
    messages = [a.message for a in acks if isinstance(a, Ack)]
    assert "escape" in messages[0] and "absolute" in messages[1] and "NUL" in messages[2]
    assert "do not match" in messages[4]
    assert "not a valid DICOM file" in messages[5]
    assert files_under(root) == {}
    assert not (tmp_path / "escaped").exists()
    still_serves(srv.port)


def test_digest_mismatch_is_an_error_ack(plain_node: tuple[ServerThread, NodeAddr]) -> None:
    srv, _ = plain_node
    r = Raw(srv.port)
    r.hello()
    r.send(sop_header(0, b"abcd", sha256=hashlib.sha256(b"other").hexdigest()))
    r.send(Data(b"abcd"))
    r.send(EndOfBody())
    ack = r.event()
    assert isinstance(ack, Ack) and ack.status == "error" and "sha256 mismatch" in ack.message
    r.close()


def test_idle_clients_are_dropped(tmp_path: Path, pki_dir: Path) -> None:
    with (
        ServerThread(node_config(tmp_path / "p", None, idle_timeout=0.5)) as plain,
        ServerThread(node_config(tmp_path / "t", pki_dir, idle_timeout=0.5)) as tls,
    ):
        t0 = time.monotonic()
        socks = [
            socket.create_connection(("127.0.0.1", p), timeout=10) for p in (plain.port, tls.port)
        ]
        for s in socks:  # nothing sent; the node closes (after an ERROR frame on plaintext)
            while s.recv(65536):
                pass
            s.close()
        assert time.monotonic() - t0 < 8
        still_serves(plain.port)


def test_max_connections(tmp_path: Path) -> None:
    with ServerThread(node_config(tmp_path / "p", None, max_connections=2)) as srv:
        held = [Raw(srv.port), Raw(srv.port)]
        for h in held:
            assert isinstance(h.hello(), Welcome)
        extra = Raw(srv.port)
        extra.conn.send(Hello())
        ev = extra.event()
        assert isinstance(ev, Error) and ev.code == "busy"
        extra.close()
        for h in held:
            h.close()
        deadline = time.monotonic() + 10
        while srv.server is not None and srv.server.active and time.monotonic() < deadline:
            time.sleep(0.05)
        still_serves(srv.port)


def test_conflict_over_the_wire(
    tmp_path: Path, pki_dir: Path, creds: Credentials, node: tuple[ServerThread, NodeAddr]
) -> None:
    _, addr = node
    src = copy_testfile("CT_small.dcm", tmp_path / "a")
    assert upload_dir(tmp_path / "a", [addr], creds).ok
    altered = bytearray(src.read_bytes())
    altered[-2] ^= 0x55  # same SOP Instance UID, different pixels
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "CT_small.dcm").write_bytes(altered)
    d = upload_dir(tmp_path / "b", [addr], creds).as_dict()
    assert not d["ok"]
    assert (
        "conflict" in d["failed"][0]["reason"]
        and "refusing to overwrite" in d["failed"][0]["reason"]
    )


def test_unreachable_node_reports_failure_quickly(tmp_path: Path, creds: Credentials) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    make_series(tmp_path / "s", 3)
    sc = scan(tmp_path / "s")
    rep = asyncio.run(upload_files(sc.files, [NodeAddr("127.0.0.1", port)], creds, retries=1))
    assert not rep.ok and len(rep.failed) == 3
    assert "cannot connect" in rep.failed[0]["reason"] or "unreachable" in rep.failed[0]["reason"]


def test_json_report_shape(
    tmp_path: Path, creds: Credentials, node: tuple[ServerThread, NodeAddr]
) -> None:
    _, addr = node
    make_series(tmp_path / "s", 5)
    d = json.loads(json.dumps(upload_dir(tmp_path / "s", [addr], creds).as_dict()))
    assert set(d["nodes"][0]) >= {"node", "files", "bytes", "seconds", "mb_per_s"}
    assert d["total"]["files"] == 5 and d["ok"] is True


def test_get_of_a_missing_instance(
    creds: Credentials, node: tuple[ServerThread, NodeAddr], tmp_path: Path
) -> None:
    _, addr = node
    from transfer.errors import NotFoundError

    with pytest.raises(NotFoundError):
        asyncio.run(fetch([addr], creds, tmp_path / "o", sop="1.2.3"))


def test_connection_closed_event_on_bye(plain_node: tuple[ServerThread, NodeAddr]) -> None:
    srv, _ = plain_node
    r = Raw(srv.port)
    r.hello()
    from transfer.protocol import Bye

    r.send(Bye())
    assert isinstance(r.event(), ConnectionClosed)
    r.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_index_disk_full_gets_an_error_ack_not_a_hang(tmp_path: Path) -> None:
    from test_storage import fill, tiny_tmpfs

    root = tmp_path / "root"
    (root / ".medstream").mkdir(parents=True)
    with tiny_tmpfs(root / ".medstream", "256k") as idx:
        with ServerThread(node_config(root, None)) as srv:
            fill(idx)
            r = Raw(srv.port)  # the socket times out after 15 s: a hang fails the test
            assert isinstance(r.hello(), Welcome)
            ct = pydicom_sample("CT_small.dcm").read_bytes()
            info = inspect_path(pydicom_sample("CT_small.dcm"))
            for i in range(2):  # the connection keeps working after the first refusal
                r.send(
                    sop_header(
                        i,
                        ct,
                        kind="dicom",
                        study_uid=info.study_uid,
                        series_uid=info.series_uid,
                        sop_uid=info.sop_uid,
                    )
                )
                r.send(Data(ct))
                r.send(EndOfBody())
                ack = r.event()
                assert isinstance(ack, Ack) and ack.status == "error", ack
                assert "disk full" in ack.message
            r.close()
            assert not [p for p in root.rglob("*.dcm")]
            assert not list(root.rglob(".tmp-*"))


def test_get_of_a_file_missing_on_disk_is_a_clear_error_and_the_session_goes_on(
    tmp_path: Path, creds: Credentials, node: tuple[ServerThread, NodeAddr]
) -> None:
    srv, addr = node
    make_series(tmp_path / "s", 2)
    assert upload_dir(tmp_path / "s", [addr], creds).ok
    stored = sorted(Path(srv.cfg.storage_root).rglob("*.dcm"))
    stored[0].unlink()  # damage behind the daemon's back

    async def go() -> tuple[str, int]:
        from transfer.errors import NotFoundError

        async with NodeSession(addr, creds) as s:
            with pytest.raises(NotFoundError, match="missing on disk") as ei:
                await s.get(tmp_path / "o" / "a.dcm", sop=stored[0].stem)
            meta = await s.get(tmp_path / "o" / "b.dcm", sop=stored[1].stem)
            return str(ei.value), int(meta["size"])

    message, size = asyncio.run(go())
    assert "\n" not in message
    assert size == stored[1].stat().st_size
    assert (tmp_path / "o" / "b.dcm").read_bytes() == stored[1].read_bytes()
    assert not (tmp_path / "o" / "a.dcm").exists()


def test_idle_connections_do_not_block_other_clients(
    tmp_path: Path, creds: Credentials, node: tuple[ServerThread, NodeAddr]
) -> None:
    srv, addr = node
    idle = [socket.create_connection(("127.0.0.1", addr.port), timeout=10) for _ in range(30)]
    half = socket.create_connection(("127.0.0.1", addr.port), timeout=10)
    half.sendall(b"\x16\x03\x01")  # the start of a TLS ClientHello, then silence
    try:
        make_series(tmp_path / "s", 6)
        rep = upload_dir(tmp_path / "s", [addr], creds)  # while all of them sit there
        assert rep.ok and rep.as_dict()["total"]["files"] == 6
        got = asyncio.run(fetch([addr], creds, tmp_path / "out"))
        assert len(got) == 6
    finally:
        for s in [*idle, half]:
            s.close()


def test_get_falls_back_to_a_replica_and_never_silently_returns_part_of_a_study(
    tmp_path: Path, pki_dir: Path, creds: Credentials
) -> None:
    from transfer.errors import IncompleteFetch

    files = make_series(tmp_path / "s", 12, seed=41)
    study = inspect_path(files[0]).study_uid
    a, b = two_nodes(tmp_path, pki_dir)
    try:
        nodes = [NodeAddr("127.0.0.1", a.port, "n1"), NodeAddr("127.0.0.1", b.port, "n2")]
        assert upload_dir(tmp_path / "s", nodes, creds, replicas=1).ok
        a.stop()  # half the study is on n1 (replicas=1): the result must say it is incomplete
        with pytest.raises(IncompleteFetch, match="incomplete") as ei:
            asyncio.run(fetch(nodes, creds, tmp_path / "o1", study=study))
        assert "n1" in str(ei.value) and "\n" not in str(ei.value)
        assert len(ei.value.paths) == len(list((tmp_path / "o1").rglob("*.dcm")))
        got_from_b = list((tmp_path / "o1").rglob("*.dcm"))  # what could be fetched was
        assert 0 < len(got_from_b) < 12
    finally:
        a.stop()
        b.stop()
    # With two replicas, losing a node loses nothing.
    c, d = two_nodes(tmp_path / "r2", pki_dir)
    try:
        nodes = [NodeAddr("127.0.0.1", c.port, "n1"), NodeAddr("127.0.0.1", d.port, "n2")]
        assert upload_dir(tmp_path / "s", nodes, creds, replicas=2).ok
        c.stop()
        # Every object arrives from n2; the get still says n1 could not be asked (the client
        # cannot know that n1 held nothing else).
        with pytest.raises(IncompleteFetch, match="possibly incomplete.*n1") as ei:
            asyncio.run(fetch(nodes, creds, tmp_path / "o2", study=study))
        got = ei.value.paths
        assert sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in got) == sorted(
            hashlib.sha256(p.read_bytes()).hexdigest() for p in files
        )
    finally:
        c.stop()
        d.stop()


def test_get_survives_a_node_dropping_mid_fetch_by_using_the_other_replica(
    tmp_path: Path, pki_dir: Path, creds: Credentials
) -> None:
    files = make_series(tmp_path / "s", 8, seed=42)
    a, b = two_nodes(tmp_path, pki_dir)
    try:
        nodes = [NodeAddr("127.0.0.1", a.port, "n1"), NodeAddr("127.0.0.1", b.port, "n2")]
        assert upload_dir(tmp_path / "s", nodes, creds, replicas=2).ok
        # Damage n1's copies on disk: its answers fail, n2 has good ones.
        assert a.server is not None
        for p in Path(a.server.store.root).rglob("*.dcm"):
            p.unlink()
        got = asyncio.run(
            fetch(nodes, creds, tmp_path / "o", study=inspect_path(files[0]).study_uid)
        )
        assert len(got) == 8
        assert sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in got) == sorted(
            hashlib.sha256(p.read_bytes()).hexdigest() for p in files
        )
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_uploader_respects_the_nodes_max_frame_and_streams_big_files(
    tmp_path: Path, compression: str
) -> None:
    # 3 small files (~130 KB, sent whole) and one of ~6.5 MB (> 4 MiB: streamed in chunks),
    # to a node that accepts frames of at most 64 KiB.
    files = make_series(tmp_path / "s", 3, rows=256, cols=256, seed=51)
    files.append(
        write_ct(
            tmp_path / "s" / "big.dcm",
            study=inspect_path(files[0]).study_uid,
            series=inspect_path(files[0]).series_uid,
            sop="1.2.826.0.1.3680043.8.498.999",
            rows=1800,
            cols=1800,
        )
    )
    assert files[-1].stat().st_size > 4 << 20
    with ServerThread(node_config(tmp_path / "root", None, max_frame=65536)) as srv:
        addr = NodeAddr("127.0.0.1", srv.port)
        rep = upload_dir(tmp_path / "s", [addr], Credentials.plaintext(), compression=compression)
        assert rep.ok, rep.failed
        got = asyncio.run(fetch([addr], Credentials.plaintext(), tmp_path / "out"))
        assert sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in got) == sorted(
            hashlib.sha256(p.read_bytes()).hexdigest() for p in files
        )


def test_tls_client_on_a_plaintext_node_gets_a_hint(
    plain_node: tuple[ServerThread, NodeAddr], creds: Credentials
) -> None:
    _, addr = plain_node
    with pytest.raises(NodeError, match="TLS handshake failed.*insecure-plaintext"):
        asyncio.run(NodeSession(addr, creds).open(timeout=5))
