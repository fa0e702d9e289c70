"""The floor under any Python implementation of issue 2's data path on this machine.

    python bench/ceiling.py serve PORT DIR [--hash]      # one receiver (run N of them)
    python bench/ceiling.py send HOST:PORT,... FILE... [--hash]

No protocol beyond what the design cannot do without: per file a name, a size and the body,
streamed over one TCP connection per node (files dealt round-robin, like ``ftpput.py``), written
to DIR on the receiver, answered with one 32-byte digest per file that the sender checks. With
``--hash`` both ends compute SHA-256 (hashlib, OpenSSL with SHA-NI here), as issue 2 requires
(the node verifies before acknowledging, the sender knows the digest of what it read).
Without it, the digests are zero: what the copies and sockets alone cost. No TLS, no token, no
fsync, no rename, no index, no DICOM validation: everything medstream does beyond this costs
time on top. 1 MiB reads and writes, threads on the sender (hashlib and socket calls release
the GIL), ``TCP_NODELAY`` on both ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import socket
import struct
import sys
import threading
import time
from pathlib import Path

_HEAD = struct.Struct("!HQ")  # name length, body size
_ZERO = bytes(32)
_BUF = 1 << 20


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = conn.recv(n - len(out))
        if not got:
            raise ConnectionError("peer closed mid-frame")
        out += got
    return bytes(out)


def _serve_one(conn: socket.socket, out: Path, do_hash: bool) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(_BUF)
    view = memoryview(buf)
    with conn:
        while True:
            first = conn.recv(_HEAD.size)
            if not first:
                return
            head = first + _recv_exact(conn, _HEAD.size - len(first))
            nlen, size = _HEAD.unpack(head)
            name = _recv_exact(conn, nlen).decode()
            if "/" in name or name.startswith("."):
                raise ValueError(f"bad name {name!r}")
            h = hashlib.sha256() if do_hash else None
            fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                left = size
                while left:
                    n = conn.recv_into(view[: min(left, _BUF)])
                    if not n:
                        raise ConnectionError("peer closed mid-body")
                    if h is not None:
                        h.update(view[:n])
                    os.write(fd, view[:n])
                    left -= n
            finally:
                os.close(fd)
            conn.sendall(h.digest() if h is not None else _ZERO)


def serve(port: int, out: Path, do_hash: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with socket.create_server(("127.0.0.1", port), backlog=64) as srv:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=_serve_one, args=(conn, out, do_hash), daemon=True).start()


def send(nodes: list[tuple[str, int]], files: list[Path], do_hash: bool) -> dict[str, object]:
    errors: list[str] = []
    sent = [0] * len(nodes)

    def worker(i: int) -> None:
        share = files[i :: len(nodes)]
        expect: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        try:
            with socket.create_connection(nodes[i]) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

                def acks() -> None:  # pipelined: read digests while sending
                    for path in share:
                        got = _recv_exact(s, 32)
                        if got != expect.get(timeout=60):
                            errors.append(f"{path.name}: digest mismatch")

                reader = threading.Thread(target=acks)
                reader.start()
                buf = bytearray(_BUF)
                view = memoryview(buf)
                for path in share:
                    size = path.stat().st_size
                    name = path.name.encode()
                    s.sendall(_HEAD.pack(len(name), size) + name)
                    h = hashlib.sha256() if do_hash else None
                    with path.open("rb", buffering=0) as fp:
                        while n := fp.readinto(buf):
                            if h is not None:
                                h.update(view[:n])
                            s.sendall(view[:n])
                            sent[i] += n
                    # Known only once the body is read: the digest trails the body (a real
                    # protocol would send it in a trailer frame).
                    expect.put(h.digest() if h is not None else _ZERO)
                reader.join()
        except OSError as exc:
            errors.append(f"node {i}: {exc}")

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"files": len(files), "bytes": sum(sent), "seconds": time.perf_counter() - started,
            "errors": errors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("port", type=int)
    sv.add_argument("dir", type=Path)
    sv.add_argument("--hash", action="store_true")
    sd = sub.add_parser("send")
    sd.add_argument("nodes")
    sd.add_argument("files", nargs="+", type=Path)
    sd.add_argument("--hash", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "serve":
        serve(a.port, a.dir, a.hash)
        return 0
    nodes = [(h, int(port)) for h, _, port in (n.rpartition(":") for n in a.nodes.split(","))]
    res = send(nodes, a.files, a.hash)
    print(json.dumps(res))
    for e in res["errors"]:  # type: ignore[attr-defined]
        print(f"ceiling: {e}", file=sys.stderr)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
