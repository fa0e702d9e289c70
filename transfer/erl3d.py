"""The 2013 wire format (the paper's Erlang system), sans I/O.

One file per TCP connection. The client sends one ``{packet, 4}`` frame: a 4-byte big-endian
length, then ``term_to_binary([Filename | Data])`` in Erlang's external term format (ETF). The
server answers with one frame carrying ``term_to_binary(Filename)``.

With ``Filename`` a string and ``Data`` a binary, ``[Filename | Data]`` is an improper list::

    131  LIST_EXT(108) len=1  STRING_EXT(107) u16 chars...  BINARY_EXT(109) u32 bytes...

We also accept a proper list ``[Filename, Data]`` (tail NIL_EXT), a binary or code-point list
as the filename, ``Data`` as a list of bytes, and a zlib-compressed term (tag 80), since the
original client may have used any of them. Only the subset of ETF these terms need is parsed.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final

from transfer.errors import RemoteProtocolError

VERSION: Final = 131
COMPRESSED: Final = 80
SMALL_INTEGER_EXT: Final = 97
INTEGER_EXT: Final = 98
SMALL_TUPLE_EXT: Final = 104
NIL_EXT: Final = 106
STRING_EXT: Final = 107
LIST_EXT: Final = 108
BINARY_EXT: Final = 109
SMALL_ATOM_UTF8_EXT: Final = 119

_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Erl3dRequest:
    filename: str
    data: bytes
    filename_term: bytes  # the filename's own encoding (without the version byte)


class _Reader:
    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise RemoteProtocolError("erl3d: truncated external term")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        v: int = struct.unpack(">H", self.take(2))[0]
        return v

    def u32(self) -> int:
        v: int = _U32.unpack(self.take(4))[0]
        return v


def _string_term(r: _Reader) -> tuple[str | None, bytes | None]:
    """Parse a term that may be a filename; returns (text, None) or (None, binary)."""
    tag = r.u8()
    if tag == STRING_EXT:
        return r.take(r.u16()).decode("latin-1"), None
    if tag == BINARY_EXT:
        raw = r.take(r.u32())
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError:
            raise RemoteProtocolError("erl3d: filename binary is not UTF-8") from None
    if tag == NIL_EXT:
        return "", None
    if tag == LIST_EXT:
        n = r.u32()
        if n > 4096:
            raise RemoteProtocolError("erl3d: filename too long")
        chars = [_small_int(r) for _ in range(n)]
        if r.u8() != NIL_EXT:
            raise RemoteProtocolError("erl3d: filename is not a proper list")
        try:
            return "".join(chr(c) for c in chars), None
        except (ValueError, OverflowError):
            raise RemoteProtocolError("erl3d: filename has an invalid code point") from None
    raise RemoteProtocolError(f"erl3d: unexpected term tag {tag} where a filename was expected")


def _small_int(r: _Reader) -> int:
    tag = r.u8()
    if tag == SMALL_INTEGER_EXT:
        return r.u8()
    if tag == INTEGER_EXT:
        v: int = struct.unpack(">i", r.take(4))[0]
        return v
    raise RemoteProtocolError(f"erl3d: expected an integer, got tag {tag}")


def decode_request(payload: bytes, *, max_size: int) -> Erl3dRequest:
    """Decode ``term_to_binary([Filename | Data])``; raise RemoteProtocolError on anything else."""
    if not payload or payload[0] != VERSION:
        raise RemoteProtocolError("erl3d: not an Erlang external term (version byte 131 missing)")
    if len(payload) > 1 and payload[1] == COMPRESSED:
        if len(payload) < 6:
            raise RemoteProtocolError("erl3d: truncated compressed term")
        size = _U32.unpack_from(payload, 2)[0]
        if size > max_size:
            raise RemoteProtocolError(
                f"erl3d: compressed term expands to {size} bytes, over {max_size}"
            )
        d = zlib.decompressobj()
        try:
            inner = d.decompress(payload[6:], size)
        except zlib.error as exc:
            raise RemoteProtocolError(f"erl3d: bad compressed term ({exc})") from None
        if len(inner) != size:
            raise RemoteProtocolError("erl3d: compressed term has the wrong size")
        payload = bytes([VERSION]) + inner
    r = _Reader(payload, 1)
    if r.u8() != LIST_EXT:
        raise RemoteProtocolError("erl3d: expected a list [Filename | Data]")
    count = r.u32()
    if count < 1:
        raise RemoteProtocolError("erl3d: empty list")
    start = r.pos
    filename, _ = _string_term(r)
    assert filename is not None
    fn_term = payload[start : r.pos]
    rest = count - 1
    data: bytes
    if rest == 0:
        tag = r.u8()
        if tag == BINARY_EXT:
            data = r.take(r.u32())
        elif tag == NIL_EXT:
            data = b""
        elif tag == STRING_EXT:  # [Filename | "bytes"] of an all-small-int list
            data = r.take(r.u16())
        else:
            raise RemoteProtocolError(f"erl3d: Data must be a binary (tag {tag})")
    elif rest == 1 and r.buf[r.pos : r.pos + 1] == bytes([BINARY_EXT]):
        r.u8()
        data = r.take(r.u32())
        if r.u8() != NIL_EXT:
            raise RemoteProtocolError("erl3d: malformed list tail")
    else:
        if rest > max_size:
            raise RemoteProtocolError("erl3d: term too large")
        out = bytearray()
        for _ in range(rest):
            v = _small_int(r)
            if not 0 <= v <= 255:
                raise RemoteProtocolError("erl3d: Data list holds a non-byte")
            out.append(v)
        if r.u8() != NIL_EXT:
            raise RemoteProtocolError("erl3d: malformed list tail")
        data = bytes(out)
    if r.pos != len(r.buf):
        raise RemoteProtocolError(f"erl3d: {len(r.buf) - r.pos} trailing bytes after the term")
    return Erl3dRequest(filename=filename, data=data, filename_term=fn_term)


def encode_filename(filename: str) -> bytes:
    """The ETF encoding of an Erlang string (without the version byte)."""
    if filename == "":
        return bytes([NIL_EXT])
    if len(filename) <= 0xFFFF and all(ord(c) < 256 for c in filename):
        raw = filename.encode("latin-1")
        return bytes([STRING_EXT]) + struct.pack(">H", len(raw)) + raw
    out = bytearray([LIST_EXT]) + _U32.pack(len(filename))
    for c in filename:
        cp = ord(c)
        if cp < 256:
            out += bytes([SMALL_INTEGER_EXT, cp])
        else:
            out += bytes([INTEGER_EXT]) + struct.pack(">i", cp)
    out.append(NIL_EXT)
    return bytes(out)


def encode_request(filename: str, data: bytes) -> bytes:
    """``term_to_binary([Filename | Data])`` framed with a 4-byte length (``{packet, 4}``)."""
    body = bytes([VERSION, LIST_EXT]) + _U32.pack(1) + encode_filename(filename)
    body += bytes([BINARY_EXT]) + _U32.pack(len(data))
    return _U32.pack(len(body) + len(data)) + body + data


def encode_reply(filename_term: bytes) -> bytes:
    """``term_to_binary(Filename)`` framed, reusing the filename's encoding as received."""
    body = bytes([VERSION]) + filename_term
    return _U32.pack(len(body)) + body


def encode_error(reason: str) -> bytes:
    """``term_to_binary({error, <<Reason>>})`` framed: what we answer instead of the filename."""
    raw = reason.encode("utf-8")[:65535]
    body = (
        bytes([VERSION, SMALL_TUPLE_EXT, 2, SMALL_ATOM_UTF8_EXT, 5])
        + b"error"
        + bytes([BINARY_EXT])
        + _U32.pack(len(raw))
        + raw
    )
    return _U32.pack(len(body)) + body


def decode_reply(payload: bytes) -> tuple[bool, str]:
    """(True, filename) for the normal answer, (False, reason) for our ``{error, Reason}``."""
    if not payload or payload[0] != VERSION:
        raise RemoteProtocolError("erl3d: reply is not an external term")
    if len(payload) > 2 and payload[1] == SMALL_TUPLE_EXT:
        r = _Reader(payload, 3)
        if r.u8() == SMALL_ATOM_UTF8_EXT:
            r.take(r.u8())
            _, _ = None, None
            if r.u8() == BINARY_EXT:
                return False, r.take(r.u32()).decode("utf-8", "replace")
        raise RemoteProtocolError("erl3d: unexpected tuple in reply")
    r = _Reader(payload, 1)
    name, _ = _string_term(r)
    assert name is not None
    return True, name
