"""The sans-I/O protocol core on an in-memory pair: no sockets."""

from __future__ import annotations

import hashlib
import struct

import pytest
import zstandard

from transfer.protocol import (
    NEED_DATA,
    Ack,
    BodyDecoder,
    BodyEncoder,
    Bye,
    Connection,
    ConnectionClosed,
    Data,
    EndOfBody,
    Error,
    Event,
    FileHeader,
    FrameType,
    Hello,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    State,
    Welcome,
)

SHA = hashlib.sha256(b"hello").hexdigest()


def header(i: int, size: int = 5, **kw: object) -> FileHeader:
    base: dict[str, object] = dict(
        file_id=i,
        name=f"f{i}.dcm",
        size=size,
        sha256=SHA,
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        sop_uid=f"1.2.3.4.{i}",
    )
    base.update(kw)
    return FileHeader(**base)  # type: ignore[arg-type]


def pump(src: Connection, dst: Connection, *events: Event) -> list[Event]:
    """Send events from src, feed the bytes to dst, return what dst parsed."""
    for ev in events:
        dst.receive_data(src.send(ev))
    return drain(dst)


def drain(conn: Connection) -> list[Event]:
    out: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        assert isinstance(ev, Event)
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


def pair() -> tuple[Connection, Connection]:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    assert pump(c, s, Hello(token="t" * 20, client="test")) == [Hello("t" * 20, "test", (1,))]
    assert pump(s, c, Welcome(node="n1")) == [Welcome(node="n1")]
    assert c.our_state is State.READY and s.their_state is State.READY
    return c, s


def test_handshake_and_pipelined_files_acked_in_order() -> None:
    c, s = pair()
    sent: list[Event] = []
    for i in range(3):
        sent += [header(i), Data(b"hel"), Data(b"lo"), EndOfBody()]
    got = pump(c, s, *sent)
    assert got == sent  # three files on the wire before any ack: no round trip per file
    assert s.owed == 3 and c.files_in_flight == 3
    acks = [Ack(i, "stored", sha256=SHA, path=f"p{i}") for i in range(3)]
    assert pump(s, c, *acks) == acks
    assert c.files_in_flight == 0 and s.owed == 0


def test_requests_interleave_with_files_and_answers_keep_order() -> None:
    c, s = pair()
    pump(c, s, header(0), Data(b"hello"), EndOfBody(), Request(1, "list", {"study": "1.2"}))
    with pytest.raises(LocalProtocolError, match="out of order"):
        s.send(Response(1, True, []))  # the file's ack is owed first
    c2, s2 = pair()
    pump(c2, s2, header(0), Data(b"hello"), EndOfBody(), Request(1, "get", {"sop": "1"}))
    out = pump(
        s2,
        c2,
        Ack(0, "exists", sha256=SHA),
        Response(1, True, {"size": 3}, body=True),
        Data(b"abc"),
        EndOfBody(),
    )
    assert [type(e) for e in out] == [Ack, Response, Data, EndOfBody]
    assert c2.their_state is State.READY


def test_byte_at_a_time_and_buffer_protocol_paths_agree() -> None:
    c, s = pair()
    big = bytes(range(256)) * 1000  # > inline size: filled in place
    frames = b"".join(c.send(e) for e in (header(0, size=len(big)), Data(big), EndOfBody()))
    # 1: one byte at a time through receive_data
    for b in frames[:70000]:
        s.receive_data(bytes([b]))
    # 2: the rest through get_buffer/buffer_updated (what asyncio.BufferedProtocol does)
    rest = memoryview(frames[70000:])
    while rest:
        buf = s.get_buffer(-1)
        n = min(len(buf), len(rest), 777)
        buf[:n] = rest[:n]
        s.buffer_updated(n)
        rest = rest[n:]
    got = drain(s)
    assert isinstance(got[0], FileHeader)
    assert isinstance(got[1], Data) and bytes(got[1].data) == big
    assert isinstance(got[2], EndOfBody)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "unknown frame type"),
        (struct.pack(">BI", FrameType.HELLO, 5) + b"nope!", "not JSON"),
        (struct.pack(">BI", FrameType.HELLO, 2) + b"[]", "JSON object"),
        (struct.pack(">BI", FrameType.HELLO, 2) + b"{}", "not a medstream client"),
        (struct.pack(">BI", FrameType.END, 0), "must start with HELLO"),
        (struct.pack(">BI", FrameType.WELCOME, 2) + b"{}", "WELCOME"),
        (struct.pack(">BI", FrameType.HELLO, 64 << 20), "exceeds the limit"),
        (struct.pack(">BI", FrameType.DATA, 1 << 30), "exceeds the limit"),
    ],
)
def test_garbage_from_client_is_a_remote_error(raw: bytes, match: str) -> None:
    s = Connection(Role.SERVER)
    s.receive_data(raw)
    with pytest.raises(RemoteProtocolError, match=match):
        s.next_event()
    assert s.their_state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    assert s.send_error("protocol", "bye")[:1] == bytes([FrameType.ERROR])


def test_oversize_frame_is_refused_from_the_header_alone() -> None:
    s = Connection(Role.SERVER, max_frame=4096)
    s.receive_data(struct.pack(">BI", FrameType.DATA, 4097))  # no payload needed
    with pytest.raises(RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.code == "frame-too-large"


def test_bad_file_headers() -> None:
    c, s = pair()
    for bad, match in [
        ({"sha256": "xyz"}, "sha256"),
        ({"sop_uid": "1.2.abc"}, "not a valid DICOM UID"),
        ({"sop_uid": ""}, "not a valid DICOM UID"),
        ({"size": -1}, "size"),
        ({"compression": "lz4"}, "compression"),
    ]:
        with pytest.raises(LocalProtocolError, match=match):
            c.send(header(0, **bad))
    # A hand-made header with a bad UID is refused on receipt too.
    payload = b'{"id":0,"name":"x","size":1,"sha256":"' + SHA.encode() + b'","sop":"../../etc"}'
    s.receive_data(struct.pack(">BI", FrameType.FILE, len(payload)) + payload)
    with pytest.raises(RemoteProtocolError, match="UID"):
        s.next_event()
    # Other (non-DICOM) files need no UIDs.
    c2, s2 = pair()
    assert pump(c2, s2, header(0, kind="other", sop_uid="", study_uid="", series_uid=""))


def test_body_longer_or_shorter_than_declared() -> None:
    c, _ = pair()
    c.send(header(0, size=2))
    with pytest.raises(LocalProtocolError, match="longer"):
        c.send(Data(b"abc"))
    c, s = pair()
    s.receive_data(c.send(header(0, size=2)) + struct.pack(">BI", FrameType.DATA, 3) + b"abc")
    with pytest.raises(RemoteProtocolError, match="longer"):
        drain(s)
    c, s = pair()
    s.receive_data(c.send(header(0, size=5)) + c.send(Data(b"he")))
    s.receive_data(struct.pack(">BI", FrameType.END, 0))
    with pytest.raises(RemoteProtocolError, match="short"):
        drain(s)


def test_truncated_frames_and_eof() -> None:
    c, s = pair()
    frame = c.send(header(0))
    s.receive_data(frame[:-3])
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated FILE frame"):
        s.next_event()
    c, s = pair()
    s.receive_data(b"\x04\x00")
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated frame header"):
        s.next_event()
    c, s = pair()
    s.receive_data(c.send(header(0, size=100000)) + c.send(Data(b"x" * 50000))[:40000])
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        drain(s)
    c, s = pair()
    pump(c, s, header(0, size=5), Data(b"hel"))
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a body"):
        drain(s)
    c, s = pair()
    pump(c, s, Bye())
    s.receive_data(b"")
    assert drain(s) == [ConnectionClosed()]


def test_server_cannot_speak_first_or_ack_unasked() -> None:
    c, s = pair()
    with pytest.raises(LocalProtocolError, match="nobody asked"):
        s.send(Ack(7, "stored"))
    raw = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError, match="before HELLO"):
        raw.send(Welcome())
    # A client receiving an unasked ack from a rogue server:
    rogue = struct.pack(">BI", FrameType.ACK, 26) + b'{"id":1,"status":"stored"}'
    c.receive_data(rogue)
    with pytest.raises(RemoteProtocolError, match="nobody asked"):
        c.next_event()


def test_error_frame_reaches_client() -> None:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    pump(c, s, Hello(token="wrong"))
    c.receive_data(s.send_error("auth", "authentication failed"))
    assert drain(c) == [Error("auth", "authentication failed")]
    c.receive_data(b"")
    assert drain(c) == [ConnectionClosed()]


def test_unknown_request_op_and_version_negotiation() -> None:
    c, s = pair()
    with pytest.raises(LocalProtocolError, match="unknown request op"):
        c.send(Request(1, "rm -rf", {}))
    c = Connection(Role.CLIENT)
    c.send(Hello())
    payload = b'{"proto":"medstream","version":99}'
    c.receive_data(struct.pack(">BI", FrameType.WELCOME, len(payload)) + payload)
    with pytest.raises(RemoteProtocolError, match="unsupported version 99"):
        c.next_event()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_body_codecs_stream(compression: str) -> None:
    data = (b"CT slice " * 50000) + bytes(range(256)) * 100
    enc = BodyEncoder(compression)
    wire = [enc.encode(data[i : i + 65536]) for i in range(0, len(data), 65536)] + [enc.flush()]
    if compression == "zstd":
        assert sum(map(len, wire)) < len(data) // 5
    out = bytearray()
    dec = BodyDecoder(compression, len(data), out.extend)
    for w in wire:
        dec.decode(w)
    dec.finish()
    assert bytes(out) == data and dec.total == len(data)


def test_zstd_bomb_and_corrupt_body_are_refused() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    assert len(bomb) < 1 << 16
    sink: list[int] = []
    dec = BodyDecoder("zstd", 1000, lambda b: sink.append(len(b)))
    with pytest.raises(RemoteProtocolError, match="more than its declared size"):
        dec.decode(bomb)
    assert sum(sink) <= 1 << 19  # stopped after at most a couple of blocks
    dec = BodyDecoder("zstd", 1000, lambda b: None)
    with pytest.raises(RemoteProtocolError, match="corrupt zstd"):
        dec.decode(b"\x28\xb5\x2f\xfd" + b"\xff" * 64)
