"""Goodput measurement between lab hosts: a TCP receiver and a multi-flow sender.

Goodput is measured at the receiver, from the first to the last byte of each flow, so queued
bytes (bufferbloat) are counted when they arrive, not when the sender wrote them.

    python -m labnet.measure recv --bind 10.213.77.10 --port 5201 --flows 4
    python -m labnet.measure send --to 10.213.77.10:5201 --flows 4 --seconds 5

Library: :func:`measure` runs receivers on some lab hosts and a sender on another and returns
the per-flow and aggregate figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import LabError

if TYPE_CHECKING:
    from .lab import Host

CHUNK = 64 * 1024


def receive(bind: str, port: int, flows: int, accept_timeout: float, ready: Any = None) -> dict[str, Any]:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(max(16, flows))
    srv.settimeout(accept_timeout)
    if ready is not None:
        ready()
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def drain(conn: socket.socket, peer: str) -> None:
        n, first, last = 0, 0.0, 0.0
        conn.settimeout(accept_timeout)
        try:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                now = time.monotonic()
                if n == 0:
                    first = now
                n += len(data)
                last = now
        except OSError:
            pass
        finally:
            conn.close()
        with lock:
            results.append({"peer": peer, "bytes": n, "first": first, "last": last})

    threads = []
    try:
        for _ in range(flows):
            conn, addr = srv.accept()
            t = threading.Thread(target=drain, args=(conn, f"{addr[0]}:{addr[1]}"), daemon=True)
            t.start()
            threads.append(t)
    except TimeoutError:
        pass
    finally:
        srv.close()
    for t in threads:
        t.join(timeout=accept_timeout + 600)
    return {**summarize(results), "ip": bind, "port": port}


def summarize(flows: list[dict[str, Any]]) -> dict[str, Any]:
    active = [f for f in flows if f["bytes"] > 0]
    for f in flows:
        dur = f["last"] - f["first"]
        f["seconds"] = dur
        f["mbps"] = f["bytes"] * 8 / dur / 1e6 if dur > 0 else 0.0
    total = sum(f["bytes"] for f in flows)
    if active:
        span = max(f["last"] for f in active) - min(f["first"] for f in active)
    else:
        span = 0.0
    return {"flows": flows, "bytes": total, "seconds": span,
            "mbps": total * 8 / span / 1e6 if span > 0 else 0.0}


def send(targets: Sequence[tuple[str, int]], flows: int, seconds: float,
         congestion: str | None = None, nbytes: int | None = None) -> dict[str, Any]:
    """Send zeros to every target on ``flows`` connections each for ``seconds``, or, with
    ``nbytes``, exactly that many bytes on each connection. ``congestion`` picks the TCP
    congestion control of these connections (e.g. ``cubic``; default: the host's)."""
    payload = b"\0" * CHUNK
    sent: list[int] = []
    lock = threading.Lock()
    errors: list[str] = []

    def one(host: str, port: int) -> None:
        n = 0
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if congestion:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
                sock.settimeout(10)
                sock.connect((host, port))
                sock.settimeout(seconds + 60)
                end = time.monotonic() + seconds
                while n < nbytes if nbytes is not None else time.monotonic() < end:
                    size = CHUNK if nbytes is None else min(CHUNK, nbytes - n)
                    sock.sendall(payload[:size])
                    n += size
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)  # wait for the receiver to close: everything was delivered
        except OSError as exc:
            with lock:
                errors.append(f"{host}:{port}: {exc}")
        with lock:
            sent.append(n)

    threads = [threading.Thread(target=one, args=t, daemon=True)
               for t in targets for _ in range(flows)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    return {"sent_bytes": sum(sent), "wall": time.monotonic() - t0, "errors": errors}


@dataclass
class Measurement:
    sender: dict[str, Any]
    receivers: dict[str, dict[str, Any]]   # host name -> summary

    @property
    def total_mbps(self) -> float:
        """Aggregate goodput over all receivers (bytes / span from first to last byte seen)."""
        flows = [f for r in self.receivers.values() for f in r["flows"] if f["bytes"] > 0]
        if not flows:
            return 0.0
        span = max(f["last"] for f in flows) - min(f["first"] for f in flows)
        return sum(f["bytes"] for f in flows) * 8 / span / 1e6 if span > 0 else 0.0

    def flow_mbps(self) -> list[float]:
        return sorted(f["mbps"] for r in self.receivers.values() for f in r["flows"])

    def host_mbps(self) -> dict[str, float]:
        return {name: r["mbps"] for name, r in self.receivers.items()}


def measure(src: Host, dsts: Sequence[Host], *, seconds: float = 5.0, flows: int = 1,
            port: int = 5201, congestion: str | None = None,
            nbytes: int | None = None) -> Measurement:
    """Send from src to every host of dsts (flows connections each) for about ``seconds``, or
    ``nbytes`` bytes per connection; the receivers time the bytes. ``congestion`` sets the sender's
    TCP congestion control for these connections (default: src's). Bounded: fails rather than
    hangs."""
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for d in dsts:
            p = d.popen([sys.executable, "-m", "labnet.measure", "recv", "--bind", d.ip,
                         "--port", str(port), "--flows", str(flows), "--timeout", "30"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs[d.name] = p
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise LabError(f"receiver on {d.name} did not start: {line!r} {p.stderr.read() if p.stderr else ''}")
        targets = ",".join(f"{d.ip}:{port}" for d in dsts)
        argv = [sys.executable, "-m", "labnet.measure", "send", "--to", targets,
                "--flows", str(flows), "--seconds", str(seconds)]
        if congestion:
            argv += ["--congestion", congestion]
        if nbytes is not None:
            argv += ["--bytes", str(nbytes)]
        cp = src.run(argv, timeout=seconds + 180)
        sender = json.loads(cp.stdout)
        if sender["errors"]:
            raise LabError(f"sender errors: {'; '.join(sender['errors'])}")
        receivers = {}
        for name, p in procs.items():
            out, err = p.communicate(timeout=120)
            if p.returncode != 0:
                raise LabError(f"receiver on {name} failed: {err.strip()}")
            receivers[name] = json.loads(out)
        return Measurement(sender, receivers)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
                p.communicate(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labnet.measure", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv", help="accept FLOWS connections, time them, print JSON")
    r.add_argument("--bind", required=True)
    r.add_argument("--port", type=int, default=5201)
    r.add_argument("--flows", type=int, default=1)
    r.add_argument("--timeout", type=float, default=30.0, help="accept/idle timeout, seconds")
    s = sub.add_parser("send", help="send zeros on FLOWS connections per target for SECONDS "
                                    "(or BYTES each)")
    s.add_argument("--to", required=True, help="ip:port[,ip:port...]")
    s.add_argument("--flows", type=int, default=1)
    s.add_argument("--seconds", type=float, default=5.0)
    s.add_argument("--bytes", type=int, default=None, dest="nbytes",
                   help="send exactly this many bytes per connection instead of for SECONDS")
    s.add_argument("--congestion", default=None,
                   help="TCP congestion control for these connections, e.g. cubic (default: the host's)")
    args = ap.parse_args(argv)
    if args.cmd == "recv":
        def ready() -> None:
            print("ready", flush=True)
        print(json.dumps(receive(args.bind, args.port, args.flows, args.timeout, ready)))
    else:
        targets = []
        for item in args.to.split(","):
            host, _, port = item.rpartition(":")
            targets.append((host, int(port)))
        if args.nbytes is not None and args.nbytes < 0:
            ap.error("--bytes must not be negative")
        print(json.dumps(send(targets, args.flows, args.seconds, args.congestion, args.nbytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
