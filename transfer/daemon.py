"""``transferd``: the node daemon, a thin asyncio adapter around :mod:`transfer.protocol`.

Disk work, hashing, decompression and DICOM parsing run in worker threads; the event loop only
moves frames. Each connection has one reader (this coroutine) and one ordered answer writer, so
files are pipelined: while file N is committed (fsync, rename, index) file N+1 is being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import importlib
import json
import logging
import os
import socket
import ssl
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import click

from transfer import erl3d
from transfer.config import DaemonConfig, load_daemon_config
from transfer.errors import (
    ConfigError,
    ConflictError,
    ProtocolError,
    RemoteProtocolError,
    TransferError,
    ValidationError,
)
from transfer.protocol import (
    NEED_DATA,
    Ack,
    BodyDecoder,
    Bye,
    Connection,
    ConnectionClosed,
    Data,
    EndOfBody,
    Error,
    FileHeader,
    Hello,
    Request,
    Response,
    Role,
    State,
    Welcome,
    choose_version,
)
from transfer.storage import Store, Upload, safe_name

log = logging.getLogger("transferd")
READ_SIZE = 1 << 20
ANSWER_QUEUE = 64
CHUNK = 1 << 20


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def server_ssl_context(cfg: DaemonConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load TLS certificate {cfg.tls_cert} / key {cfg.tls_key}: "
            f"{getattr(exc, 'strerror', None) or exc} (make them with `transfer pki issue`; "
            "--insecure-plaintext only for benchmarks)"
        ) from None
    if cfg.client_ca:
        try:
            ctx.load_verify_locations(cafile=cfg.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load client CA {cfg.client_ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    # No TLS 1.3 session tickets: the uploader opens each connection afresh and never resumes
    # (asyncio has no way to offer a session), so the two tickets OpenSSL sends by default were
    # 510 bytes and two encryptions per connection for nothing (30 nodes: 30 handshakes).
    ctx.num_tickets = 0
    return ctx


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if len(token) < 16:
        raise ConfigError(f"token in {path} is shorter than 16 characters")
    return token


class _FileSink:
    """The per-file receiving state: decoder -> upload. Every method runs in a worker thread
    (through the connection's :class:`_Serial`), never on the event loop, and never raises."""

    def __init__(self, store: Store, header: FileHeader) -> None:
        self.store = store
        self.header = header
        self.upload: Upload | None = None
        self.decoder: BodyDecoder | None = None
        self.error: str = ""

    def fail(self, message: str) -> None:
        if not self.error:
            self.error = message
        if self.upload is not None:
            self.upload.abort()

    def begin(self) -> None:
        h = self.header
        try:
            self.upload = self.store.begin(
                kind=h.kind,
                name=h.name,
                size=h.size,
                sha256=h.sha256,
                study=h.study_uid,
                series=h.series_uid,
                sop=h.sop_uid,
            )
            self.decoder = BodyDecoder(h.compression, h.size, self.upload.write)
        except (TransferError, OSError) as exc:
            self.fail(str(exc))
        except Exception as exc:  # a bug: answer the file with an error, keep serving
            log.exception("unexpected error starting %s", h.name)
            self.fail(f"internal error: {type(exc).__name__}: {exc}")

    def feed(self, chunk: bytes | bytearray) -> None:
        if self.error or self.decoder is None:
            return
        try:
            self.decoder.decode(chunk)
        except (TransferError, OSError) as exc:
            self.fail(str(exc))
        except Exception as exc:  # a bug: answer the file with an error, keep serving
            log.exception("unexpected error receiving %s", self.header.name)
            self.fail(f"internal error: {type(exc).__name__}: {exc}")

    def commit(self) -> Ack:
        h = self.header
        if not self.error and self.decoder is not None and self.upload is not None:
            try:
                self.decoder.finish()
                res = self.upload.commit()
                return Ack(h.file_id, res.status, sha256=res.sha256, path=res.path)
            except ConflictError as exc:
                return Ack(h.file_id, "conflict", message=str(exc))
            except (TransferError, OSError) as exc:
                self.fail(str(exc))
            except Exception as exc:  # a bug: answer the file with an error, keep serving
                log.exception("unexpected error committing %s", h.name)
                self.fail(f"internal error: {type(exc).__name__}: {exc}")
        if self.upload is not None:
            self.upload.abort()
        return Ack(h.file_id, "error", message=self.error or "upload failed")


class _Serial:
    """Run callables in submission order on a shared pool, one at a time per connection.

    The reader never awaits a chunk write: it queues it and goes on parsing; only when more
    than ``budget`` bytes are queued does it wait (bounded memory, back-pressure to the socket).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, budget: int = 8 << 20
    ) -> None:
        self.loop = loop
        self.executor = executor
        self.budget = budget
        self._ops: deque[tuple[Callable[[], Any], asyncio.Future[Any] | None, int]] = deque()
        self._lock = threading.Lock()
        self._running = False
        self._queued = 0
        self._waiting = False
        self._room = asyncio.Event()

    async def submit(
        self, fn: Callable[[], Any], nbytes: int = 0, want_result: bool = False
    ) -> asyncio.Future[Any] | None:
        while True:
            with self._lock:
                if self._queued <= self.budget:
                    break
                self._waiting = True
                self._room.clear()
            await self._room.wait()
        fut: asyncio.Future[Any] | None = self.loop.create_future() if want_result else None
        with self._lock:
            self._queued += nbytes
            self._ops.append((fn, fut, nbytes))
            start = not self._running
            self._running = True
        if start:
            self.executor.submit(self._drain)
        return fut

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._ops:
                    self._running = False
                    return
                fn, fut, n = self._ops.popleft()
            try:
                res, exc = fn(), None
            except BaseException as e:  # delivered to the awaiting coroutine
                res, exc = None, e
            wake = False
            with self._lock:
                self._queued -= n
                if self._waiting and self._queued <= self.budget:
                    self._waiting = False
                    wake = True
            if wake:
                self.loop.call_soon_threadsafe(self._room.set)
            if fut is not None:
                self.loop.call_soon_threadsafe(_settle, fut, res, exc)


def _settle(fut: asyncio.Future[Any], res: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)


class NodeServer:
    """The daemon: a native listener and optionally an erl3d listener, sharing one store."""

    def __init__(self, cfg: DaemonConfig, *, token: str | None = None) -> None:
        self.cfg = cfg
        self.store = Store(cfg.storage_root)
        self.node_name = cfg.node_name or socket.gethostname()
        self.token = token
        self.ssl: ssl.SSLContext | None = None
        if not cfg.insecure_plaintext:
            self.ssl = server_ssl_context(cfg)
            if self.token is None:
                self.token = read_token(cfg.token_file)
        self.active = 0
        self.served = 0
        self.peak_active = 0  # most connections open at once (tests, diagnostics)
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="transferd-io")
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0
        self.erl3d_port = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        cfg = self.cfg
        if cfg.insecure_plaintext:
            log.warning(
                "INSECURE: plaintext without TLS and without a token on %s:%s -- "
                "anyone who can reach this port can read and write medical images",
                cfg.bind,
                cfg.port,
            )
        loop = asyncio.get_running_loop()
        # Import pydicom now (hundreds of ms), not while the first upload waits for its ack.
        await self._run(importlib.import_module, "pydicom.filereader")
        try:
            srv = await loop.create_server(
                lambda: _Pipe(self),
                cfg.bind,
                cfg.port,
                ssl=self.ssl,
                ssl_handshake_timeout=cfg.idle_timeout if self.ssl else None,
                backlog=min(cfg.max_connections, 1024),
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {cfg.bind}:{cfg.port}: {exc.strerror or exc}"
            ) from None
        self._servers.append(srv)
        self.port = srv.sockets[0].getsockname()[1]
        log.info(
            "node %s serving %s on %s:%d, storage %s",
            self.node_name,
            "plaintext" if self.ssl is None else ("mTLS" if cfg.client_ca else "TLS"),
            cfg.bind,
            self.port,
            self.store.root,
        )
        if self.store.removed_temps:
            log.warning("removed %d temp files left by an earlier crash", self.store.removed_temps)
        if self.store.reindexed:
            log.warning(
                "indexed %d complete files an earlier crash left without their index row",
                self.store.reindexed,
            )
        if cfg.erl3d_port:
            try:
                esrv = await asyncio.start_server(self._erl3d, cfg.bind, cfg.erl3d_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {cfg.bind}:{cfg.erl3d_port} (erl3d): {exc.strerror or exc}"
                ) from None
            self._servers.append(esrv)
            self.erl3d_port = esrv.sockets[0].getsockname()[1]
            log.warning(
                "erl3d compatibility port %s:%d is plaintext and unauthenticated (the 2013 format)",
                cfg.bind,
                self.erl3d_port,
            )

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    async def close(self) -> None:
        for s in self._servers:
            s.close()
        for t in list(self._tasks):
            t.cancel()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 5)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    def _run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ native protocol
    async def _native(self, pipe: _Pipe) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = pipe.peer
        conn = pipe.conn
        if self.active >= self.cfg.max_connections:
            log.warning("refusing %s: %d connections already open", peer, self.active)
            with contextlib.suppress(Exception):
                pipe.write(conn.send_error("busy", "too many connections, try again later"))
                await asyncio.wait_for(pipe.drain(), 5)
            await pipe.close()
            if task is not None:
                self._tasks.discard(task)
            return
        self.active += 1
        self.served += 1
        self.peak_active = max(self.peak_active, self.active)
        answers: asyncio.Queue[Callable[[], Awaitable[None]] | None] = asyncio.Queue(ANSWER_QUEUE)
        answerer = asyncio.create_task(self._answer_loop(answers, pipe))
        sink: _FileSink | None = None
        serial = _Serial(asyncio.get_running_loop(), self.executor)
        files = 0
        try:
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    pipe.want_more()
                    try:
                        async with asyncio.timeout(self.cfg.idle_timeout):
                            await pipe.data_ready.wait()
                    except TimeoutError:
                        log.info("%s: idle for %.0fs, closing", peer, self.cfg.idle_timeout)
                        await self._put_frame(
                            answers, conn.send_error("idle-timeout", "idle timeout")
                        )
                        break
                    continue
                pipe.consumed()
                if isinstance(ev, Data):
                    if sink is not None:
                        await serial.submit(functools.partial(sink.feed, ev.data), len(ev.data))
                elif isinstance(ev, FileHeader):
                    sink = _FileSink(self.store, ev)
                    await serial.submit(sink.begin)
                    files += 1
                elif isinstance(ev, EndOfBody):
                    assert sink is not None
                    fut = await serial.submit(sink.commit, want_result=True)
                    assert fut is not None
                    await answers.put(self._ack_writer(fut, conn, pipe, peer))
                    sink = None
                elif isinstance(ev, Request):
                    await answers.put(self._request_writer(ev, conn, pipe))
                elif isinstance(ev, Hello):
                    await self._put_frame(answers, self._hello(ev, conn, peer))
                    if conn.our_state is State.ERROR:
                        break
                elif isinstance(ev, Bye | ConnectionClosed | Error):
                    if isinstance(ev, Error):
                        log.info("%s: client error %s: %s", peer, ev.code, ev.message)
                    break
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error: %s", peer, exc)
            with contextlib.suppress(Exception):
                await self._put_frame(answers, conn.send_error(exc.code, str(exc)))
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.info("%s: connection lost: %s", peer, exc)
        finally:
            if sink is not None:
                last = await serial.submit(
                    functools.partial(sink.fail, "connection closed mid-file"), want_result=True
                )
                if last is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(last), 60)
            with contextlib.suppress(Exception):
                await answers.put(None)
                await asyncio.wait_for(answerer, 30)
            answerer.cancel()
            await pipe.close()
            self.active -= 1
            if task is not None:
                self._tasks.discard(task)
            log.debug("%s: closed after %d files", peer, files)

    @staticmethod
    async def _put_frame(
        answers: asyncio.Queue[Callable[[], Awaitable[None]] | None], frame: bytes
    ) -> None:
        await answers.put(_FrameItem(frame))

    async def _answer_loop(
        self,
        answers: asyncio.Queue[Callable[[], Awaitable[None]] | None],
        writer: _Pipe,
    ) -> None:
        try:
            while True:
                item = await answers.get()
                if item is None:
                    return
                if isinstance(item, _FrameItem):
                    writer.write(item.frame)
                else:
                    await item()
                await writer.drain()
        except Exception as exc:
            if isinstance(exc, ConnectionError | OSError | ssl.SSLError):
                log.debug("answer writer stopped: %s", exc)
            else:
                # A bug: the answers can no longer be kept in order. Drop the connection so the
                # client notices at once (and retries) instead of waiting for acks forever.
                log.exception("%s: answer writer failed, dropping the connection", writer.peer)
            writer.abort()
            # Drain the queue so the reader never blocks on a full queue.
            while True:
                with contextlib.suppress(asyncio.QueueEmpty):
                    nxt = answers.get_nowait()
                    if nxt is None:
                        return
                    continue
                await asyncio.sleep(0.05)

    def _hello(self, ev: Hello, conn: Connection, peer: Any) -> bytes:
        version = choose_version(ev)
        if version is None:
            log.warning("%s: no common protocol version in %s", peer, ev.versions)
            return conn.send_error(
                "version",
                f"no common protocol version (server speaks 1, client {list(ev.versions)})",
            )
        if self.token is not None and not hmac.compare_digest(
            ev.token.encode(), self.token.encode()
        ):
            log.warning("%s: wrong token, refusing", peer)
            return conn.send_error("auth", "authentication failed: wrong token")
        return conn.send(
            Welcome(node=self.node_name, version=version, max_frame=self.cfg.max_frame)
        )

    def _ack_writer(
        self, fut: asyncio.Future[Ack], conn: Connection, writer: _Pipe, peer: Any
    ) -> Callable[[], Awaitable[None]]:
        async def write_ack() -> None:
            ack = await fut
            if ack.status in ("error", "conflict"):
                log.warning("%s: file %d refused: %s", peer, ack.file_id, ack.message)
            writer.write(conn.send(ack))

        return write_ack

    def _request_writer(
        self, req: Request, conn: Connection, writer: _Pipe
    ) -> Callable[[], Awaitable[None]]:
        fut = self._run(self._answer_request, req)

        async def write_response() -> None:
            resp, fp = await fut
            if fp is None:
                writer.write(conn.send(resp))
                return
            try:
                writer.write(conn.send(resp))
                while True:
                    chunk = await self._run(fp.read, min(CHUNK, self.cfg.max_frame))
                    if not chunk:
                        break
                    writer.write(conn.send(Data(chunk)))
                    await writer.drain()
                writer.write(conn.send(EndOfBody()))
            finally:
                await self._run(fp.close)

        return write_response

    def _answer_request(self, req: Request) -> tuple[Response, BinaryIO | None]:
        a = req.args
        try:
            if req.op == "ping":
                return Response(
                    req.req_id, True, {"node": self.node_name} | self.store.summary()
                ), None
            if req.op == "have":
                items = a.get("items", [])
                if not isinstance(items, list) or len(items) > 100000:
                    raise ValidationError("have: items must be a list of at most 100000 entries")
                return Response(req.req_id, True, self.store.have(items)), None
            if req.op == "list":
                rows = self.store.list(
                    study=_opt_str(a, "study"), series=_opt_str(a, "series"), sop=_opt_str(a, "sop")
                )
                return Response(req.req_id, True, rows), None
            if req.op == "stat":
                return Response(
                    req.req_id,
                    True,
                    self.store.stat(sop=_opt_str(a, "sop"), sha256=_opt_str(a, "sha256")),
                ), None
            if req.op == "get":
                meta = self.store.stat(sop=_opt_str(a, "sop"), sha256=_opt_str(a, "sha256"))
                fp = self.store.open_object(str(meta["path"]), int(meta["size"]))
                return Response(req.req_id, True, meta, body=True), fp
            raise ValidationError(f"unknown request {req.op!r}")
        except (TransferError, OSError) as exc:
            return Response(req.req_id, False, None, error=str(exc)), None

    @staticmethod
    async def _close_writer(writer: asyncio.StreamWriter) -> None:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)

    # ------------------------------------------------------------------ erl3d
    async def _erl3d(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        _nodelay(writer)
        try:
            if self.active >= self.cfg.max_connections:
                writer.write(erl3d.encode_error("busy"))
                await writer.drain()
                return
            self.active += 1
            try:
                await self._erl3d_session(reader, writer, peer)
            finally:
                self.active -= 1
        except (ConnectionError, OSError) as exc:
            log.info("erl3d %s: connection lost: %s", peer, exc)
        finally:
            await self._close_writer(writer)
            if task is not None:
                self._tasks.discard(task)

    async def _erl3d_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(self.cfg.idle_timeout):
                    head = await reader.readexactly(4)
            except TimeoutError:
                log.info("erl3d %s: idle, closing", peer)
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    log.warning("erl3d %s: truncated length prefix", peer)
                return
            length = int.from_bytes(head, "big")
            if length > self.cfg.max_frame:
                log.warning("erl3d %s: frame of %d bytes over the limit", peer, length)
                writer.write(
                    erl3d.encode_error(f"frame of {length} bytes exceeds {self.cfg.max_frame}")
                )
                await writer.drain()
                return
            try:
                async with asyncio.timeout(self.cfg.idle_timeout):
                    payload = await reader.readexactly(length)
            except (TimeoutError, asyncio.IncompleteReadError):
                log.warning("erl3d %s: truncated frame", peer)
                return
            try:
                req = erl3d.decode_request(payload, max_size=self.cfg.max_frame)
                name = safe_name(req.filename)
                res = await self._run(
                    functools.partial(
                        self.store.put_bytes,
                        req.data,
                        name=name,
                        kind=None if self.cfg.erl3d_allow_other else "dicom",
                    )
                )
                log.info("erl3d %s: %s %s -> %s", peer, res.status, req.filename, res.path)
                writer.write(erl3d.encode_reply(req.filename_term))
            except (ProtocolError, ValidationError, ConflictError) as exc:
                log.warning("erl3d %s: refused: %s", peer, exc)
                writer.write(erl3d.encode_error(str(exc)))
                await writer.drain()
                if isinstance(exc, ProtocolError):
                    return
            except (TransferError, OSError) as exc:
                log.warning("erl3d %s: failed: %s", peer, exc)
                writer.write(erl3d.encode_error(str(exc)))
            await writer.drain()


class _Pipe(asyncio.BufferedProtocol):
    """Socket adapter: the kernel reads straight into the protocol's buffers (no extra copies);
    a coroutine (:meth:`NodeServer._native`) consumes events. Reading pauses while more than
    ``MAX_PENDING`` complete frames wait, so memory stays bounded."""

    MAX_PENDING = 2

    def __init__(self, server: NodeServer) -> None:
        self.server = server
        self.conn = Connection(Role.SERVER, max_frame=server.cfg.max_frame)
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.data_ready = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._lost = asyncio.Event()
        self._paused = False
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=4 << 20)
        self._task = asyncio.get_running_loop().create_task(self.server._native(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.buffer_updated(nbytes)
        self.data_ready.set()
        if self.conn.pending_frames > self.MAX_PENDING and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self.data_ready.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        with contextlib.suppress(ProtocolError):
            self.conn.receive_data(b"")
        self.data_ready.set()
        self._can_write.set()
        self._lost.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def want_more(self) -> None:
        """The consumer ran out of events: resume reading and wait."""
        self.data_ready.clear()
        self.consumed()

    def consumed(self) -> None:
        if self._paused and self.conn.pending_frames <= self.MAX_PENDING and self.transport:
            self._paused = False
            if not self._lost.is_set():
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is None or self._lost.is_set():
            raise ConnectionResetError("connection lost")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._lost.is_set():
            raise ConnectionResetError("connection lost")
        await self._can_write.wait()

    def abort(self) -> None:
        if self.transport is not None and not self._lost.is_set():
            self.transport.abort()

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), 5)
            if not self._lost.is_set():
                self.transport.abort()


class _FrameItem:
    """A ready frame in a connection's answer queue."""

    __slots__ = ("frame",)

    def __init__(self, frame: bytes) -> None:
        self.frame = frame

    async def __call__(self) -> None:  # pragma: no cover - written directly by the loop
        return None


def _opt_str(a: dict[str, Any], key: str) -> str | None:
    v = a.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise ValidationError(f"{key} must be a string")
    return v


# ---------------------------------------------------------------------------- running


def setup_logging(log_file: str, level: int = logging.INFO) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s transferd %(levelname)s %(message)s"))
    root = logging.getLogger("transferd")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


async def run_daemon(cfg: DaemonConfig, ready_file: str | None = None) -> None:
    # The event loop shares the GIL with hashing/parsing workers: hand it over quickly.
    sys.setswitchinterval(0.0005)
    server = NodeServer(cfg)
    await server.start()
    if ready_file:
        tmp = f"{ready_file}.tmp"
        Path(tmp).write_text(
            json.dumps({"pid": os.getpid(), "port": server.port, "erl3d_port": server.erl3d_port})
        )
        os.replace(tmp, ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    serve = asyncio.create_task(server.serve_forever())
    await stop.wait()
    log.info("shutting down")
    serve.cancel()
    await server.close()


class ServerThread:
    """Run a :class:`NodeServer` on its own event loop in a thread (tests, demos, benchmarks)."""

    def __init__(self, cfg: DaemonConfig, *, token: str | None = None) -> None:
        self.cfg = cfg
        self.token = token
        self.loop = asyncio.new_event_loop()
        self.server: NodeServer | None = None
        self._thread = threading.Thread(target=self._main, name="transferd", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = NodeServer(self.cfg, token=self.token)
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.close())
        self.loop.close()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(30):
            raise TimeoutError("transferd thread did not start within 30 s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def erl3d_port(self) -> int:
        assert self.server is not None
        return self.server.erl3d_port

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_FLAG_HELP = "flag > TRANSFERD_* environment > --config file > default"


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Every setting can also come from the [transferd] section of --config or from "
    "TRANSFERD_<NAME> in the environment (" + _FLAG_HELP + ").",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML file with a [transferd] section.",
)
@click.option("--bind", help="Address to listen on (default 0.0.0.0).")
@click.option("--port", type=int, help="Native protocol port (default 7370; 0 = any free port).")
@click.option(
    "--erl3d-port", type=int, help="Also accept the 2013 Erlang wire format on this port (0 = off)."
)
@click.option(
    "--storage-root", help="Where objects and the SQLite index live (default /srv/medstream)."
)
@click.option(
    "--erl3d-allow-other",
    is_flag=True,
    default=None,
    help="On the erl3d port, also keep non-DICOM payloads (by content hash); refused by default.",
)
@click.option("--tls-cert", help="PEM certificate of this node.")
@click.option("--tls-key", help="PEM private key of this node.")
@click.option("--client-ca", help="CA that client certificates must chain to (enables mutual TLS).")
@click.option("--token-file", help="File holding the shared token clients must present.")
@click.option(
    "--insecure-plaintext",
    is_flag=True,
    default=None,
    help="No TLS and no token (benchmarks only; logged loudly).",
)
@click.option("--max-frame", type=int, help="Largest frame accepted, bytes (default 16 MiB).")
@click.option("--max-connections", type=int, help="Concurrent connections (default 256).")
@click.option(
    "--idle-timeout",
    type=float,
    help="Close connections silent for this long, seconds (default 60).",
)
@click.option("--log-file", help="Log here instead of stderr.")
@click.option("--node-name", help="Name reported to clients (default: host name).")
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    help="Write {pid, port, erl3d_port} as JSON here once listening.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(config_file: str | None, ready_file: str | None, verbose: bool, **flags: Any) -> None:
    """transferd: the medstream node daemon.

    Receives DICOM objects over TLS (token-authenticated) from `transfer upload`, verifies their
    SHA-256, writes them atomically under STORAGE_ROOT/<study>/<series>/<sop>.dcm and indexes them
    in SQLite; serves list/stat/get for retrieval.
    """
    try:
        cfg = load_daemon_config(config_file, flags)
        setup_logging(cfg.log_file, logging.DEBUG if verbose else logging.INFO)
        asyncio.run(run_daemon(cfg, ready_file))
    except TransferError as exc:
        click.echo(f"transferd: error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"transferd: error: {exc.strerror or exc}", err=True)
        sys.exit(1)


def main() -> None:
    cli(prog_name="transferd")


if __name__ == "__main__":
    main()
