"""The native medstream wire protocol, sans I/O (in the style of h11).

No sockets here: bytes go in with :meth:`Connection.receive_data`, events come out of
:meth:`Connection.next_event`, and :meth:`Connection.send` turns an event into the bytes of
exactly one frame, which the adapter writes with one call (one ``send`` per frame).

Frame: ``type (u8) | length (u32, big endian) | payload``. Control frames carry UTF-8 JSON
objects, ``DATA`` frames carry raw (possibly zstd-compressed) body bytes.

Conversation (client C, server S)::

    C: HELLO {proto, versions, token, client}     S: WELCOME {version, node, max_frame}
    C: FILE {id, name, size, sha256, kind, compression, study, series, sop}
    C: DATA ... DATA   C: END                     S: ACK {id, status, sha256, message, path}
    C: REQUEST {id, op, args}                     S: RESPONSE {id, ok, result, error, body}
                                                  S: (DATA ... END when body is true: "get")
    either side: ERROR {code, message} (fatal, then close)      C: BYE

Files and requests are pipelined: the client never waits for an ACK before sending the next
file; the server answers ACKs and RESPONSEs in the order it received FILEs and REQUESTs.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Final, Literal, cast

from transfer.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = [
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "DEFAULT_MAX_FRAME",
    "MAX_CONTROL_FRAME",
    "Role",
    "State",
    "FrameType",
    "Event",
    "Hello",
    "Welcome",
    "FileHeader",
    "Data",
    "EndOfBody",
    "Ack",
    "Request",
    "Response",
    "Error",
    "Bye",
    "ConnectionClosed",
    "NEED_DATA",
    "NeedData",
    "Connection",
    "BodyEncoder",
    "BodyDecoder",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ACK_STATUSES",
    "REQUEST_OPS",
]

PROTOCOL_NAME: Final = "medstream"
PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
MAX_CONTROL_FRAME: Final = 4 * 1024 * 1024
_HDR = struct.Struct(">BI")
_INBUF = 64 * 1024
_INLINE_DATA = 32 * 1024  # DATA payloads above this get their own buffer
HEADER_SIZE: Final = _HDR.size

ACK_STATUSES: Final = ("stored", "exists", "conflict", "error")
REQUEST_OPS: Final = ("have", "list", "stat", "get", "ping")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_NAME = 4096


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    FILE = 3
    DATA = 4
    END = 5
    ACK = 6
    REQUEST = 7
    RESPONSE = 8
    ERROR = 9
    BYE = 10


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """The state of one side's outgoing stream."""

    IDLE = "idle"  # nothing sent yet (client: hello due; server: welcome due)
    HELLO_SENT = "hello-sent"  # client only: waiting for WELCOME
    READY = "ready"
    BODY = "body"  # inside a body (client: a file; server: a get response)
    CLOSED = "closed"
    ERROR = "error"


# ---------------------------------------------------------------------------- events


class Event:
    """Base class of all protocol events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Hello(Event):
    token: str = ""
    client: str = ""
    versions: tuple[int, ...] = SUPPORTED_VERSIONS


@dataclass(frozen=True, slots=True)
class Welcome(Event):
    node: str = ""
    version: int = PROTOCOL_VERSION
    max_frame: int = DEFAULT_MAX_FRAME


@dataclass(frozen=True, slots=True)
class FileHeader(Event):
    file_id: int
    name: str
    size: int
    sha256: str
    kind: Literal["dicom", "other"] = "dicom"
    compression: Literal["none", "zstd"] = "none"
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""


@dataclass(frozen=True, slots=True)
class Data(Event):
    data: bytes | bytearray


@dataclass(frozen=True, slots=True)
class EndOfBody(Event):
    pass


@dataclass(frozen=True, slots=True)
class Ack(Event):
    file_id: int
    status: Literal["stored", "exists", "conflict", "error"]
    sha256: str = ""
    message: str = ""
    path: str = ""


@dataclass(frozen=True, slots=True)
class Request(Event):
    req_id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Response(Event):
    req_id: int
    ok: bool
    result: Any = None
    error: str = ""
    body: bool = False  # DATA ... END follows (a "get")


@dataclass(frozen=True, slots=True)
class Error(Event):
    """Fatal: the sender closes the connection after it."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Bye(Event):
    pass


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    pass


class NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


# ---------------------------------------------------------------------------- payload checks


def _obj(payload: bytes | bytearray, what: str) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RemoteProtocolError(f"{what}: payload is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what}: payload must be a JSON object")
    return value


def _get(
    d: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str, default: Any = ...
) -> Any:
    if key not in d:
        if default is ...:
            raise RemoteProtocolError(f"{what}: missing field {key!r}")
        return default
    v = d[key]
    if isinstance(v, bool) and typ is int:
        raise RemoteProtocolError(f"{what}: field {key!r} must be an integer")
    if not isinstance(v, typ):
        raise RemoteProtocolError(f"{what}: field {key!r} has the wrong type")
    return v


def _check_header(h: FileHeader, err: type[ProtocolError]) -> None:
    if h.file_id < 0:
        raise err("FILE: id must be >= 0")
    if h.size < 0:
        raise err("FILE: size must be >= 0")
    if not _SHA_RE.match(h.sha256):
        raise err("FILE: sha256 must be 64 lowercase hex digits")
    if h.kind not in ("dicom", "other"):
        raise err(f"FILE: unknown kind {h.kind!r}")
    if h.compression not in ("none", "zstd"):
        raise err(f"FILE: unknown compression {h.compression!r}")
    if len(h.name) > _MAX_NAME:
        raise err("FILE: name too long")
    if h.kind == "dicom":
        for label, uid in (("study", h.study_uid), ("series", h.series_uid), ("sop", h.sop_uid)):
            if not (0 < len(uid) <= 64 and _UID_RE.match(uid)):
                raise err(f"FILE: {label} UID {uid[:80]!r} is not a valid DICOM UID")


def _dumps(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()


def _encode(event: Event) -> tuple[FrameType, bytes | bytearray]:
    if isinstance(event, Data):
        return FrameType.DATA, event.data
    if isinstance(event, EndOfBody):
        return FrameType.END, b""
    if isinstance(event, Bye):
        return FrameType.BYE, b""
    if isinstance(event, Hello):
        return FrameType.HELLO, _dumps(
            {
                "proto": PROTOCOL_NAME,
                "versions": list(event.versions),
                "token": event.token,
                "client": event.client,
            }
        )
    if isinstance(event, Welcome):
        return FrameType.WELCOME, _dumps(
            {
                "proto": PROTOCOL_NAME,
                "version": event.version,
                "node": event.node,
                "max_frame": event.max_frame,
            }
        )
    if isinstance(event, FileHeader):
        _check_header(event, LocalProtocolError)
        return FrameType.FILE, _dumps(
            {
                "id": event.file_id,
                "name": event.name,
                "size": event.size,
                "sha256": event.sha256,
                "kind": event.kind,
                "compression": event.compression,
                "study": event.study_uid,
                "series": event.series_uid,
                "sop": event.sop_uid,
            }
        )
    if isinstance(event, Ack):
        if event.status not in ACK_STATUSES:
            raise LocalProtocolError(f"ACK: unknown status {event.status!r}")
        return FrameType.ACK, _dumps(
            {
                "id": event.file_id,
                "status": event.status,
                "sha256": event.sha256,
                "message": event.message,
                "path": event.path,
            }
        )
    if isinstance(event, Request):
        return FrameType.REQUEST, _dumps({"id": event.req_id, "op": event.op, "args": event.args})
    if isinstance(event, Response):
        return FrameType.RESPONSE, _dumps(
            {
                "id": event.req_id,
                "ok": event.ok,
                "result": event.result,
                "error": event.error,
                "body": event.body,
            }
        )
    if isinstance(event, Error):
        return FrameType.ERROR, _dumps({"code": event.code, "message": event.message})
    raise LocalProtocolError(f"cannot send {type(event).__name__}")


def _decode(ftype: FrameType, payload: bytes | bytearray) -> Event:
    if ftype is FrameType.DATA:
        return Data(payload)
    if ftype in (FrameType.END, FrameType.BYE):
        if payload:
            raise RemoteProtocolError(f"{ftype.name}: payload must be empty")
        return EndOfBody() if ftype is FrameType.END else Bye()
    what = ftype.name
    d = _obj(payload, what)
    if ftype is FrameType.HELLO:
        if d.get("proto") != PROTOCOL_NAME:
            raise RemoteProtocolError("HELLO: not a medstream client")
        versions = _get(d, "versions", list, what)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
            raise RemoteProtocolError("HELLO: versions must be integers")
        return Hello(
            token=_get(d, "token", str, what, ""),
            client=_get(d, "client", str, what, ""),
            versions=tuple(versions),
        )
    if ftype is FrameType.WELCOME:
        if d.get("proto") != PROTOCOL_NAME:
            raise RemoteProtocolError("WELCOME: not a medstream server")
        return Welcome(
            node=_get(d, "node", str, what, ""),
            version=_get(d, "version", int, what),
            max_frame=_get(d, "max_frame", int, what, DEFAULT_MAX_FRAME),
        )
    if ftype is FrameType.FILE:
        h = FileHeader(
            file_id=_get(d, "id", int, what),
            name=_get(d, "name", str, what),
            size=_get(d, "size", int, what),
            sha256=_get(d, "sha256", str, what),
            kind=_get(d, "kind", str, what, "dicom"),
            compression=_get(d, "compression", str, what, "none"),
            study_uid=_get(d, "study", str, what, ""),
            series_uid=_get(d, "series", str, what, ""),
            sop_uid=_get(d, "sop", str, what, ""),
        )
        _check_header(h, RemoteProtocolError)
        return h
    if ftype is FrameType.ACK:
        status = _get(d, "status", str, what)
        if status not in ACK_STATUSES:
            raise RemoteProtocolError(f"ACK: unknown status {status!r}")
        return Ack(
            file_id=_get(d, "id", int, what),
            status=status,
            sha256=_get(d, "sha256", str, what, ""),
            message=_get(d, "message", str, what, ""),
            path=_get(d, "path", str, what, ""),
        )
    if ftype is FrameType.REQUEST:
        return Request(
            req_id=_get(d, "id", int, what),
            op=_get(d, "op", str, what),
            args=_get(d, "args", dict, what, {}),
        )
    if ftype is FrameType.RESPONSE:
        return Response(
            req_id=_get(d, "id", int, what),
            ok=_get(d, "ok", bool, what),
            result=d.get("result"),
            error=_get(d, "error", str, what, ""),
            body=_get(d, "body", bool, what, False),
        )
    if ftype is FrameType.ERROR:
        return Error(code=_get(d, "code", str, what), message=_get(d, "message", str, what, ""))
    raise RemoteProtocolError(f"unexpected frame type {ftype!r}")  # pragma: no cover


# ---------------------------------------------------------------------------- connection

_CLIENT_SENDS: Final = frozenset(
    {FrameType.HELLO, FrameType.FILE, FrameType.DATA, FrameType.END, FrameType.REQUEST}
) | {FrameType.ERROR, FrameType.BYE}
_SERVER_SENDS: Final = frozenset(
    {FrameType.WELCOME, FrameType.ACK, FrameType.RESPONSE, FrameType.DATA, FrameType.END}
) | {FrameType.ERROR}


class _Side:
    """The state of one direction of the conversation."""

    __slots__ = ("role", "state", "body_left")

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.IDLE
        self.body_left = -1  # raw bytes left in an uncompressed body, -1 = unknown


class Connection:
    """One end of a medstream connection: a state machine for both directions.

    ``send(event)`` validates the event against our state and returns one frame;
    ``receive_data(bytes)`` buffers peer bytes (``b""`` = end of stream) and ``next_event()``
    returns the next parsed event, or ``NEED_DATA``. A peer violation raises
    :class:`RemoteProtocolError` and leaves the connection in the ERROR state.
    """

    def __init__(self, role: Role, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 1024:
            raise ValueError("max_frame must be at least 1024")
        self.role = role
        self.max_frame = max_frame
        self.version = PROTOCOL_VERSION
        self._buf = bytearray()  # scratch: headers, control frames, small DATA payloads
        self._inbuf = bytearray(_INBUF)  # what get_buffer() hands out between payloads
        self._payload: bytearray | None = None  # a large DATA payload being filled in place
        self._pfill = 0
        self._frames: deque[tuple[FrameType, bytes | bytearray]] = deque()
        self._fail: RemoteProtocolError | None = None
        self._eof = False
        self.ours = _Side(role)
        self.theirs = _Side(Role.SERVER if role is Role.CLIENT else Role.CLIENT)
        # Pipelining bookkeeping: what the client has sent that the server still owes.
        self._owed: deque[tuple[str, int]] = deque()  # ("file"|"req", id) in arrival order
        self.files_in_flight = 0  # client side: FILEs sent, not yet acked

    # ------------------------------------------------------------------ state helpers
    @property
    def our_state(self) -> State:
        return self.ours.state

    @property
    def their_state(self) -> State:
        return self.theirs.state

    @property
    def owed(self) -> int:
        """Answers (ACKs / RESPONSEs) the server still owes the client."""
        return len(self._owed)

    def _transition(
        self, side: _Side, ftype: FrameType, event: Event, err: type[ProtocolError]
    ) -> None:
        allowed = _CLIENT_SENDS if side.role is Role.CLIENT else _SERVER_SENDS
        if ftype not in allowed:
            raise err(f"{side.role.value} may not send {ftype.name}")
        st = side.state
        if st in (State.CLOSED, State.ERROR):
            raise err(f"{side.role.value} sent {ftype.name} after the connection ended")
        if ftype is FrameType.ERROR:
            # Sending one puts us in ERROR; receiving one means the peer is gone (CLOSED).
            side.state = State.ERROR if err is LocalProtocolError else State.CLOSED
            return
        if side.role is Role.CLIENT:
            self._client_transition(side, ftype, event, err)
        else:
            self._server_transition(side, ftype, event, err)

    def _client_transition(
        self, side: _Side, ftype: FrameType, event: Event, err: type[ProtocolError]
    ) -> None:
        st = side.state
        if st is State.IDLE:
            if ftype is not FrameType.HELLO:
                raise err(f"client must start with HELLO, not {ftype.name}")
            side.state = State.HELLO_SENT
            return
        if st is State.HELLO_SENT:
            if ftype is FrameType.BYE:
                side.state = State.CLOSED
                return
            raise err(f"client sent {ftype.name} before WELCOME")
        if st is State.READY:
            if isinstance(event, FileHeader):
                side.state = State.BODY
                side.body_left = event.size if event.compression == "none" else -1
                self._owed.append(("file", event.file_id))
                self.files_in_flight += 1
            elif isinstance(event, Request):
                if event.op not in REQUEST_OPS:
                    raise err(f"unknown request op {event.op!r}")
                self._owed.append(("req", event.req_id))
            elif ftype is FrameType.BYE:
                side.state = State.CLOSED
            else:
                raise err(f"client sent {ftype.name} outside a file body")
            return
        if st is State.BODY:
            if isinstance(event, Data):
                self._count_body(side, len(event.data), err)
            elif ftype is FrameType.END:
                if side.body_left > 0:
                    raise err(f"file body ended {side.body_left} bytes short of its size")
                side.state = State.READY
                side.body_left = -1
            else:
                raise err(f"client sent {ftype.name} inside a file body")
            return
        raise err(f"client sent {ftype.name} in state {st.value}")  # pragma: no cover

    def _server_transition(
        self, side: _Side, ftype: FrameType, event: Event, err: type[ProtocolError]
    ) -> None:
        st = side.state
        if st is State.IDLE:
            if ftype is not FrameType.WELCOME:
                raise err(f"server must answer HELLO with WELCOME, not {ftype.name}")
            if (
                self.ours.state is not State.HELLO_SENT
                and self.theirs.state is not State.HELLO_SENT
            ):
                raise err("server sent WELCOME before HELLO")
            side.state = State.READY
            client = self.theirs if self.role is Role.SERVER else self.ours
            client.state = State.READY
            return
        if st is State.READY:
            if isinstance(event, Ack):
                self._pay("file", event.file_id, ftype, err)
            elif isinstance(event, Response):
                self._pay("req", event.req_id, ftype, err)
                if event.body:
                    side.state = State.BODY
                    side.body_left = -1
            else:
                raise err(f"server sent {ftype.name} outside a get body")
            return
        if st is State.BODY:
            if isinstance(event, Data):
                pass
            elif ftype is FrameType.END:
                side.state = State.READY
            else:
                raise err(f"server sent {ftype.name} inside a get body")
            return
        raise err(f"server sent {ftype.name} in state {st.value}")  # pragma: no cover

    def _pay(self, kind: str, ident: int, ftype: FrameType, err: type[ProtocolError]) -> None:
        if not self._owed:
            raise err(f"server sent {ftype.name} {ident} that nobody asked for")
        want_kind, want_id = self._owed[0]
        if (want_kind, want_id) != (kind, ident):
            raise err(
                f"server sent {ftype.name} {ident} out of order (expected {want_kind} {want_id})"
            )
        self._owed.popleft()
        if kind == "file":
            self.files_in_flight -= 1

    @staticmethod
    def _count_body(side: _Side, n: int, err: type[ProtocolError]) -> None:
        if side.body_left >= 0:
            if n > side.body_left:
                raise err("file body is longer than its declared size")
            side.body_left -= n

    # ------------------------------------------------------------------ sending
    def send(self, event: Event) -> bytes:
        """Return the bytes of one frame for ``event`` (write them with a single call)."""
        ftype, payload = _encode(event)
        limit = (
            self.max_frame if ftype is FrameType.DATA else min(self.max_frame, MAX_CONTROL_FRAME)
        )
        if len(payload) > limit:
            raise LocalProtocolError(f"{ftype.name} frame of {len(payload)} bytes exceeds {limit}")
        self._transition(self.ours, ftype, event, LocalProtocolError)
        if isinstance(event, Welcome):
            self.version = event.version
        return _HDR.pack(ftype, len(payload)) + payload

    def send_data_in_place(self, buf: bytearray, n: int) -> memoryview:
        """Frame ``n`` body bytes already placed at ``buf[HEADER_SIZE:HEADER_SIZE + n]``.

        Writes the DATA header into ``buf[:HEADER_SIZE]`` and returns a view of the whole frame:
        the same bytes on the wire as ``send(Data(...))``, without copying the body (the
        uploader reads files straight into reusable buffers laid out this way)."""
        if n > self.max_frame:
            raise LocalProtocolError(f"DATA frame of {n} bytes exceeds {self.max_frame}")
        if len(buf) < HEADER_SIZE + n:
            raise LocalProtocolError("buffer too small for the frame")
        view = memoryview(buf)
        self._transition(
            # The state machine only looks at the body's length: a view is enough.
            self.ours,
            FrameType.DATA,
            Data(cast(bytes, view[HEADER_SIZE : HEADER_SIZE + n])),
            LocalProtocolError,
        )
        _HDR.pack_into(buf, 0, FrameType.DATA, n)
        return view[: HEADER_SIZE + n]

    def send_error(self, code: str, message: str) -> bytes:
        """A fatal ERROR frame; allowed in any state that has not already ended."""
        payload = _dumps({"code": code, "message": message})[:MAX_CONTROL_FRAME]
        self.ours.state = State.ERROR
        return _HDR.pack(FrameType.ERROR, len(payload)) + payload

    # ------------------------------------------------------------------ receiving
    #
    # Incoming bytes are split into complete frames as they arrive (cheap: headers only);
    # decoding and state checks happen in next_event(). DATA payloads of any size are filled
    # in place: an adapter using get_buffer()/buffer_updated() (asyncio.BufferedProtocol)
    # lets the kernel copy straight into the payload buffer, with no intermediate copies.

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise RemoteProtocolError("data received after end of stream")
            return
        if not data:
            self._eof = True
            return
        view = memoryview(data).cast("B")
        while view and self._fail is None:
            if self._payload is not None:
                take = min(len(view), len(self._payload) - self._pfill)
                self._payload[self._pfill : self._pfill + take] = view[:take]
                self._pfill += take
                view = view[take:]
                self._payload_check()
                continue
            self._buf += view
            view = view[len(view) :]
            self._split()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable buffer for the next incoming bytes (asyncio.BufferedProtocol.get_buffer)."""
        if self._payload is not None:
            return memoryview(self._payload)[self._pfill :]
        return memoryview(self._inbuf)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last :meth:`get_buffer` (BufferedProtocol)."""
        if self._payload is not None:
            self._pfill += nbytes
            self._payload_check()
        else:
            self.receive_data(memoryview(self._inbuf)[:nbytes])

    def _payload_check(self) -> None:
        assert self._payload is not None
        if self._pfill == len(self._payload):
            self._frames.append((FrameType.DATA, self._payload))
            self._payload = None
            self._pfill = 0

    def _split(self) -> None:
        """Cut complete frames off the front of the scratch buffer."""
        buf = self._buf
        pos = 0
        n = len(buf)
        while n - pos >= HEADER_SIZE:
            raw_type, length = _HDR.unpack_from(buf, pos)
            try:
                ftype = FrameType(raw_type)
            except ValueError:
                self._fail = RemoteProtocolError(f"garbage: unknown frame type 0x{raw_type:02x}")
                break
            limit = (
                self.max_frame
                if ftype is FrameType.DATA
                else min(self.max_frame, MAX_CONTROL_FRAME)
            )
            if length > limit:
                self._fail = RemoteProtocolError(
                    f"{ftype.name} frame of {length} bytes exceeds the limit of {limit}",
                    code="frame-too-large",
                )
                break
            start = pos + HEADER_SIZE
            if ftype is FrameType.DATA and length > _INLINE_DATA:
                # Large payload: give it its own buffer and fill it in place from now on.
                payload = bytearray(length)
                have = min(n - start, length)
                payload[:have] = buf[start : start + have]
                pos = start + have
                if have == length:
                    self._frames.append((ftype, payload))
                else:
                    self._payload, self._pfill = payload, have
                    break
                continue
            if n - start < length:
                break
            self._frames.append((ftype, bytes(buf[start : start + length])))
            pos = start + length
        if pos:
            del buf[:pos]

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._pfill

    def next_event(self) -> Event | NeedData:
        """The next complete event from the peer, or ``NEED_DATA``."""
        if self.theirs.state is State.ERROR:
            raise RemoteProtocolError("connection is in the error state")
        if not self._frames:
            if self._fail is not None:
                self.theirs.state = State.ERROR
                raise self._fail
            if not self._eof:
                return NEED_DATA
            if self._payload is not None:
                self.theirs.state = State.ERROR
                raise RemoteProtocolError(
                    f"truncated DATA frame ({self._pfill} of {len(self._payload)} bytes)"
                )
            if self._buf:
                self.theirs.state = State.ERROR
                if len(self._buf) < HEADER_SIZE:
                    raise RemoteProtocolError(
                        f"truncated frame header ({len(self._buf)} bytes at end of stream)"
                    )
                raw_type, length = _HDR.unpack_from(self._buf)
                raise RemoteProtocolError(
                    f"truncated {FrameType(raw_type).name} frame "
                    f"({len(self._buf) - HEADER_SIZE} of {length} bytes)"
                )
            if self.theirs.state not in (State.CLOSED, State.ERROR):
                clean = self.theirs.state in (State.READY, State.IDLE, State.HELLO_SENT)
                self.theirs.state = State.CLOSED
                if not clean:
                    raise RemoteProtocolError("connection closed in the middle of a body")
            return ConnectionClosed()
        ftype, payload = self._frames.popleft()
        try:
            event = _decode(ftype, payload)
            self._transition(self.theirs, ftype, event, RemoteProtocolError)
        except RemoteProtocolError:
            self.theirs.state = State.ERROR
            raise
        if isinstance(event, Welcome):
            if event.version not in SUPPORTED_VERSIONS:
                self.theirs.state = State.ERROR
                raise RemoteProtocolError(f"server chose unsupported version {event.version}")
            self.version = event.version
        return event

    @property
    def pending_frames(self) -> int:
        """Complete frames received but not yet returned by next_event()."""
        return len(self._frames)

    def events(self) -> list[Event]:
        """All complete events currently buffered (stops at NEED_DATA)."""
        out: list[Event] = []
        while True:
            ev = self.next_event()
            if isinstance(ev, NeedData):
                return out
            out.append(ev)
            if isinstance(ev, ConnectionClosed | Error | Bye):
                return out


def choose_version(hello: Hello) -> int | None:
    """The highest version both sides speak, or None."""
    common = set(hello.versions) & set(SUPPORTED_VERSIONS)
    return max(common) if common else None


# ---------------------------------------------------------------------------- body codecs


def _zstd() -> Any:
    """The zstandard module, imported on first use (10 ms of every start-up otherwise)."""
    import zstandard

    return zstandard


class BodyEncoder:
    """Streaming body encoder (identity or zstd level 1). CPU work: call it off the event loop."""

    def __init__(self, compression: str, *, level: int = 1) -> None:
        if compression not in ("none", "zstd"):
            raise LocalProtocolError(f"unknown compression {compression!r}")
        self.compression = compression
        self._cobj = (
            _zstd().ZstdCompressor(level=level).compressobj() if compression == "zstd" else None
        )

    def encode(self, chunk: bytes) -> bytes:
        if self._cobj is None:
            return chunk
        out: bytes = self._cobj.compress(chunk)
        return out

    def flush(self) -> bytes:
        if self._cobj is None:
            return b""
        out: bytes = self._cobj.flush()
        return out


class _LimitedSink:
    def __init__(
        self, limit: int, on_output: Callable[[bytes | bytearray | memoryview], None]
    ) -> None:
        self.limit = limit
        self.total = 0
        self.on_output = on_output

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.total += len(data)
        if self.total > self.limit:
            raise RemoteProtocolError(
                f"body decodes to more than its declared size of {self.limit} bytes",
                code="too-large",
            )
        if data:
            self.on_output(data)
        return len(data)


class BodyDecoder:
    """Streaming body decoder; output goes to ``on_output`` and may never exceed ``limit``.

    A zstd stream that would expand past the declared size (a decompression bomb) raises
    :class:`RemoteProtocolError` after at most one internal block of output.
    """

    def __init__(
        self,
        compression: str,
        limit: int,
        on_output: Callable[[bytes | bytearray | memoryview], None],
    ) -> None:
        if compression not in ("none", "zstd"):
            raise RemoteProtocolError(f"unknown compression {compression!r}")
        self.compression = compression
        self._sink = _LimitedSink(limit, on_output)
        self._writer: Any = None
        self._error: type[Exception] | tuple[()] = ()  # zstd's error, once zstd is in use
        if compression == "zstd":
            zstd = _zstd()
            self._error = zstd.ZstdError
            dctx = zstd.ZstdDecompressor(max_window_size=1 << 27)
            self._writer = dctx.stream_writer(
                cast(IO[bytes], self._sink), write_size=1 << 18, closefd=False
            )

    @property
    def total(self) -> int:
        return self._sink.total

    def decode(self, chunk: bytes | bytearray) -> None:
        if self._writer is None:
            self._sink.write(chunk)
            return
        try:
            self._writer.write(chunk)
        except self._error as exc:
            raise RemoteProtocolError(f"corrupt zstd body: {exc}", code="bad-body") from None

    def finish(self) -> None:
        if self._writer is not None:
            try:
                self._writer.flush()
            except self._error as exc:
                raise RemoteProtocolError(f"corrupt zstd body: {exc}", code="bad-body") from None
