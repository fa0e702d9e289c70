"""The threaded XML-RPC server (moto's ThreadedMotoServer shape) and the SimServer facade.

One HTTPS listener per simulated host, each on its own loopback address (127.<a>.<b>.N) and all on
the same port, so ``HOST_IS_SLAVE`` carries a bare address as xapi's does. POST ``/`` and ``/RPC2``
speak XML-RPC; anything else is 404; malformed XML gets HTTP 500 with an HTML body.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import xmlrpc.client
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from . import api_core, api_devices, api_more, api_pool, api_vm  # noqa: F401  (register handlers)
from .backends import GuestBackend, load_backend
from .db import new_uuid
from .dispatch import Dispatcher, DropConnection
from .errors import ConfigError, UnknownHost, XapisimError
from .faults import Faults
from .fixtures import GiB, HostSpec
from .latency import LatencyModel
from .models import XapiModel
from .pki import CertificateAuthority
from .wire import jsonrpc_response, parse_request, response_xml

log = logging.getLogger("xapisim")


@dataclass
class SimConfig:
    hosts: int = 3
    backend: str = "memory"
    sync_interval: float = 5.0       # seconds between full DB backups master -> slaves (xapi: 300)
    latency: Any = None              # None | profile name ("realistic") | mapping | LatencyModel
    tls: bool = True
    host_memory: int = 8 * GiB
    host_cpus: int = 4
    shared_sr: bool = True           # an NFS SR on the first host (pool-wide storage once joined)
    node_template: bool = True       # "CentOS 7 (medstream node)" on the first host
    username: str = "root"
    password: str | None = None      # None: a random one
    address_prefix: str | None = None  # "127.0.10" -> hosts 127.0.10.1..N; None: random 127.<a>.<b>
    port: int = 0                    # 0: any free port (the same on every host address)
    name_prefix: str = "host"
    workdir: str | None = None       # where certs and the credentials file go; None: a temp dir
    backend_options: dict[str, Any] = field(default_factory=dict)
    faults: list[dict[str, Any]] | None = None
    seed: int | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> SimConfig:
        """Read a YAML config: top-level keys are SimConfig fields (latency, faults, ...)."""
        import yaml
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping")
        data = data.get("xapisim", data)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


@dataclass(frozen=True)
class HostInfo:
    name: str
    address: str
    uuid: str


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 sim: SimServer, node_name: str, context: ssl.SSLContext | None) -> None:
        self.sim = sim
        self.node_name = node_name
        self.ssl_context = context
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(addr, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle/delayed-ACK stalls
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self.conn_lock:
            self.connections.add(sock)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that drops the connection or refuses our certificate mid-handshake is the
        client's business: log it, as xapi does, instead of socketserver's traceback on stderr
        (which landed between the test runner's progress dots)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError)):
            log.info("%s: connection from %s ended: %s", self.node_name, client_address[0], exc)
            return
        log.exception("%s: request from %s failed", self.node_name, client_address[0])

    def shutdown_request(self, request: Any) -> None:
        with self.conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_all(self) -> None:
        with self.conn_lock:
            conns = list(self.connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 600

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.server.node_name, format % args)

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.settimeout(30)
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                self.close_connection = True
                raise
            self.connection.settimeout(self.timeout)

    def handle(self) -> None:
        try:
            super().handle()
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError):
            pass

    def do_GET(self) -> None:
        self._send(404, b"<html><body><h1>HTTP 404 Not Found</h1></body></html>", "text/html")

    def do_PUT(self) -> None:
        """``PUT /import_raw_vdi?vdi=<ref>&format=raw`` (session_id as query arg or cookie): the
        bytes are written to ``<workdir>/vdi-<uuid>.raw`` (``sim.vdi_file(uuid)``)."""
        from urllib.parse import parse_qs, urlsplit
        sim = self.server.sim
        node = sim.model.nodes[self.server.node_name]
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        cookies = dict(c.strip().split("=", 1) for c in self.headers.get("Cookie", "").split(";")
                       if "=" in c)
        session = query.get("session_id") or cookies.get("session_id", "")
        if url.path != "/import_raw_vdi":
            self._discard_body()
            self._send(404, b"<html><body><h1>HTTP 404 Not Found</h1></body></html>", "text/html")
            return
        with sim.model.lock:
            db = node.db if node.is_master else None
            ok_session = db is not None and db.exists("session", session)
            vdi = query.get("vdi", "")
            uuid = db.get("VDI", vdi)["uuid"] if ok_session and db is not None and db.exists("VDI", vdi) else ""
            size = db.get("VDI", vdi)["virtual_size"] if uuid and db is not None else 0
        if not ok_session:
            self._discard_body()
            self._send(403, b"<html><body><h1>HTTP 403 Forbidden</h1></body></html>", "text/html")
            return
        if not uuid or query.get("format", "raw") not in ("raw", "vhd"):
            self._discard_body()
            self._send(404, b"<html><body><h1>HTTP 404 Not Found</h1></body></html>", "text/html")
            return
        length = int(self.headers.get("Content-Length", "0") or 0)
        if length > size:
            self._discard_body()
            self._send(500, b"<html><body><h1>HTTP 500 Internal Server Error</h1></body></html>",
                       "text/html")
            return
        with open(sim.vdi_file(uuid), "wb") as out:
            left = length
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
        self._send(200, b"", "text/plain")

    def _discard_body(self) -> None:
        left = int(self.headers.get("Content-Length", "0") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)

    def do_POST(self) -> None:
        sim = self.server.sim
        node = sim.model.nodes[self.server.node_name]
        length = int(self.headers.get("Content-Length", "0") or 0)
        body = self.rfile.read(length)
        if not node.alive:
            self.close_connection = True
            self.connection.close()
            return
        path = self.path.split("?", 1)[0]
        if path == "/jsonrpc":
            self._jsonrpc(body)
            return
        if path not in ("/", "/RPC2"):
            self._send(404, b"<html><body><h1>HTTP 404 Not Found</h1></body></html>", "text/html")
            return
        try:
            method, params = parse_request(body)
        except Exception:
            self._send(500, b"<html><body><h1>HTTP 500 Internal Server Error</h1></body></html>",
                       "text/html")
            return
        try:
            result = sim.dispatcher.handle(self.server.node_name, method, params)
        except DropConnection:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if not node.alive:  # killed while the call ran: the answer never leaves the host
            self.close_connection = True
            return
        self._send(200, response_xml(result), "text/xml")

    def _jsonrpc(self, body: bytes) -> None:
        sim = self.server.sim
        try:
            req = json.loads(body)
            method = req["method"]
            params = req.get("params", [])
            if not isinstance(method, str) or not isinstance(params, list):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self._send(500, b"<html><body><h1>HTTP 500 Internal Server Error</h1></body></html>",
                       "text/html")
            return
        try:
            result = sim.dispatcher.handle(self.server.node_name, method, tuple(params))
        except DropConnection:
            self.close_connection = True
            return
        payload = jsonrpc_response(result, req.get("id"), req.get("jsonrpc") == "2.0")
        self._send(200, json.dumps(payload).encode(), "application/json")

    def _send(self, code: int, payload: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class SimServer:
    """A simulated set of XenServer hosts. See docs/INTERFACES.md (xapisim)."""

    def __init__(self, config: SimConfig | None = None, backend: GuestBackend | None = None) -> None:
        self.config = config or SimConfig()
        if self.config.hosts < 1 or self.config.hosts > 250:
            raise ConfigError("hosts must be between 1 and 250")
        self.username = self.config.username
        self.password = self.config.password or secrets.token_urlsafe(18)
        self.latency = LatencyModel.from_config(self.config.latency)
        self.faults = Faults()
        self.faults.load(self.config.faults)
        self._backend = backend
        self.hosts: list[HostInfo] = []
        self.port = 0
        self.fingerprints: dict[str, str] = {}
        self.ca_file = ""
        self.credentials_file = ""
        self.workdir: Path | None = None
        self._own_workdir = False
        self._servers: dict[str, _Server] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._contexts: dict[str, ssl.SSLContext | None] = {}
        self._started = False
        self._sessions: list[Any] = []
        self.model: XapiModel
        self.dispatcher: Dispatcher
        self.backend: GuestBackend

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> SimServer:
        if self._started:
            return self
        cfg = self.config
        if cfg.workdir:
            self.workdir = Path(cfg.workdir)
            if not self.workdir.exists():
                self.workdir.mkdir(parents=True, mode=0o700)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="xapisim-"))  # 0700
            self._own_workdir = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def _start(self) -> None:
        cfg = self.config
        assert self.workdir is not None
        names = [f"{cfg.name_prefix}-{i}" for i in range(1, cfg.hosts + 1)]
        if self._backend is None:
            options = dict(cfg.backend_options)
            if cfg.backend == "memory":
                options.setdefault("ip_delay", self.latency.guest_ip)
            self._backend = load_backend(cfg.backend, **options)
        self.backend = self._backend
        prefixes = [cfg.address_prefix] if cfg.address_prefix else self._random_prefixes()
        last_error: Exception | None = None
        for prefix in prefixes:
            addresses = [f"{prefix}.{i}" for i in range(1, cfg.hosts + 1)]
            try:
                socks, port = self._bind_all(addresses, cfg.port)
            except OSError as e:
                last_error = e
                continue
            break
        else:
            raise XapisimError(f"cannot bind the host addresses: {last_error}")
        self.port = port
        self.hosts = [HostInfo(n, a, new_uuid()) for n, a in zip(names, addresses, strict=True)]
        if cfg.tls:
            ca = CertificateAuthority(self.workdir)
            self.ca_file = str(ca.ca_file)
            for h in self.hosts:
                cert = ca.issue(h.name, h.address)
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
                self._contexts[h.name] = ctx
                self.fingerprints[h.name] = cert.fingerprint
        else:
            self._contexts = {h.name: None for h in self.hosts}
        specs = [
            HostSpec(h.name, h.address, h.uuid, memory_total=cfg.host_memory, cpus=cfg.host_cpus,
                     shared_sr=cfg.shared_sr and i == 0, node_template=cfg.node_template and i == 0)
            for i, h in enumerate(self.hosts)
        ]
        self.model = XapiModel(specs, self.backend, username=self.username, password=self.password,
                               latency=self.latency, sync_interval=cfg.sync_interval, seed=cfg.seed)
        self.model.on_kill = lambda node: self._stop_listener(node.name)
        self.model.on_revive = lambda node: self._start_listener(node.name)
        self.dispatcher = Dispatcher(self.model, self.faults)
        for h, sock in zip(self.hosts, socks, strict=True):
            sock.close()
            self._start_listener(h.name)
        self.model.start_sync()
        self._write_credentials()

    def _random_prefixes(self) -> list[str]:
        rng = random.Random()
        return [f"127.{rng.randint(10, 250)}.{rng.randint(0, 255)}" for _ in range(20)]

    @staticmethod
    def _bind_all(addresses: list[str], port: int) -> tuple[list[socket.socket], int]:
        socks: list[socket.socket] = []
        try:
            for addr in addresses:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr, port))
                socks.append(s)
                port = s.getsockname()[1]
        except OSError:
            for s in socks:
                s.close()
            raise
        return socks, port

    def _start_listener(self, name: str) -> None:
        host = self.host(name)
        server = _Server((host.address, self.port), _Handler, self, name, self._contexts[name])
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"xapisim-{name}", daemon=True)
        self._servers[name] = server
        self._threads[name] = thread
        thread.start()

    def _stop_listener(self, name: str) -> None:
        server = self._servers.pop(name, None)
        thread = self._threads.pop(name, None)
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_all()
        if thread is not None:
            thread.join(timeout=5)

    def _write_credentials(self) -> None:
        assert self.workdir is not None
        path = self.workdir / "credentials.json"
        data: dict[str, Any] = {
            "username": self.username,
            "password": self.password,
            "ca_file": self.ca_file,
            "port": self.port,
            "scheme": "https" if self.config.tls else "http",
            "hosts": [{"name": h.name, "address": h.address, "uuid": h.uuid, "url": self.url_for(h.name),
                       "fingerprint": self.fingerprints.get(h.name, "")} for h in self.hosts],
            "fingerprints": self.fingerprints,
            "backend": self.backend.name,
        }
        for key in ("ssh_config", "private_key", "known_hosts"):  # the lab backend's SSH material
            value = getattr(self.backend, key, None)
            if value:
                data[key] = str(value)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        self.credentials_file = str(path)

    def stop(self) -> None:
        for session in self._sessions:  # close the client transports sim.session() handed out
            try:
                session("close")()
            except Exception:
                pass
        self._sessions.clear()
        for name in list(self._servers):
            self._stop_listener(name)
        if getattr(self, "model", None) is not None:
            self.model.stop()
        if self._backend is not None:
            try:
                self._backend.close()
            finally:
                self._backend = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.workdir is not None:  # a caller's directory: remove only what we wrote
            names = ["credentials.json", "ca.crt"] + [f"{h.name}.{ext}" for h in self.hosts
                                                      for ext in ("crt", "key")]
            for name in names:
                (self.workdir / name).unlink(missing_ok=True)
            for leftover in self.workdir.glob("vdi-*.raw"):
                leftover.unlink(missing_ok=True)
        self._started = False

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- facade ---------------------------------------------------------------------------------
    def host(self, name: str) -> HostInfo:
        for h in self.hosts:
            if h.name == name or h.address == name:
                return h
        raise UnknownHost(f"no simulated host {name!r}; hosts are {', '.join(h.name for h in self.hosts)}")

    def url_for(self, name: str) -> str:
        h = self.host(name)
        return f"{'https' if self.config.tls else 'http'}://{h.address}:{self.port}/"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this simulator's CA (verification on)."""
        return ssl.create_default_context(cafile=self.ca_file)

    def transport(self) -> xmlrpc.client.Transport:
        if not self.config.tls:
            return xmlrpc.client.Transport()
        return xmlrpc.client.SafeTransport(context=self.ssl_context())

    def session(self, name: str | None = None, *, login: bool = True, originator: str = "xapisim") -> Any:
        """A real ``XenAPI.Session`` to a host (verifying its certificate), logged in by default."""
        import XenAPI
        target = name or self.master_name()
        s = XenAPI.Session(self.url_for(target), transport=self.transport())
        self._sessions.append(s)
        if login:
            s.xenapi.login_with_password(self.username, self.password, "2.21", originator)
        return s

    def join_all(self, master: str | None = None) -> None:
        """Join every other host to ``master`` (default host-1) with pool.join over the wire."""
        target = self.host(master or self.hosts[0].name)
        for h in self.hosts:
            if h.name != target.name:
                self.session(h.name).xenapi.pool.join(target.address, self.username, self.password)

    def master_name(self) -> str:
        """The first live host that believes it is a master (pools of one included)."""
        for h in self.hosts:
            node = self.model.nodes[h.name]
            if node.is_master and node.alive:
                return h.name
        return self.hosts[0].name

    def vdi_file(self, vdi_uuid: str) -> Path:
        """Where bytes PUT to /import_raw_vdi for a VDI are kept (removed by stop())."""
        assert self.workdir is not None
        return self.workdir / f"vdi-{vdi_uuid}.raw"

    def reset(self) -> None:
        """All hosts fresh and standalone again, faults cleared (same addresses, port, certificates)."""
        self.faults.clear()
        self.model.reset()

    def kill_host(self, name: str) -> None:
        self.model.kill_host(self.host(name).name)

    def revive_host(self, name: str) -> None:
        self.model.revive_host(self.host(name).name)
