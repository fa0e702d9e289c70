"""Sessions to a XenServer pool over the unmodified XenAPI SDK.

Strategy: ``XenAPI.Session`` accepts an ``xmlrpc.client`` transport. :class:`XapiTransport` is an
HTTPS transport that

* verifies the server: system CAs, a CA file, or pinned SHA-256 certificate fingerprints (per host,
  since every XenServer host has its own self-signed certificate), or nothing with ``insecure``
  (said loudly on stderr once per host);
* counts every XML-RPC request by method name (:class:`CallStats`, for the benchmark);
* never re-sends a request blindly: the stdlib transport retries any request once on a connection
  reset, which would duplicate a ``VM.clone``; here only :class:`Xapi` decides what is retried.

:class:`Xapi` wraps one logged-in ``XenAPI.Session``:

* ``HOST_IS_SLAVE [master]`` at login (or later, after a master change) is followed to the master,
  keeping the URL's scheme and port;
* ``SESSION_INVALID`` is handled by the SDK (re-login with the remembered credentials, 3 tries);
  when that is exhausted xenctl logs in once more itself;
* ``TOO_MANY_PENDING_TASKS`` / ``HOST_STILL_BOOTING`` are retried with exponential backoff (they
  are refused before anything runs); connection resets are retried only for read-only calls;
* every failure leaves through :func:`xenctl.errors.map_xapi_errors`.

An ``Xapi`` is used by one thread at a time; :meth:`Xapi.fork` gives another thread its own
connection and session.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import http.client
import logging
import random
import ssl
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import XenAPI

from .errors import (
    CredentialsError,
    TLSError,
    TransientError,
    XapiConnectionError,
    XapiError,
    XenctlError,
    map_xapi_errors,
)
from .spec import PoolSpec, Secret, TLSSpec, url_host

__all__ = ["CallStats", "Xapi", "XapiTransport", "connect", "is_read_only", "replace_host"]

log = logging.getLogger("xenctl")

ORIGINATOR = "xenctl"
API_VERSION = "1.0"

_READ_ONLY_MESSAGES = {
    "event.from", "host.compute_free_memory", "VM.get_possible_hosts", "VM.assert_can_boot_here",
    "session.login_with_password", "session.slave_local_login_with_password",
    "session.get_this_host", "pool.get_all", "event.get_current_id",
}


def is_read_only(method: str) -> bool:
    """True for calls that change nothing, so a dropped connection may simply be retried."""
    name = method.removeprefix("Async.")
    last = name.rsplit(".", 1)[-1]
    return name in _READ_ONLY_MESSAGES or last.startswith("get_")


def replace_host(url: str, host: str) -> str:
    """``url`` with its host replaced, keeping scheme and port (IPv6 bracketed)."""
    parts = urlsplit(url)
    netloc = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))


@dataclass
class CallStats:
    """Counts XML-RPC requests per method (thread-safe)."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, method: str) -> None:
        with self.lock:
            self.counts[method] += 1

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


_warned_insecure: set[str] = set()
_warn_lock = threading.Lock()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS connection checking the peer certificate's SHA-256 against pins before any byte
    of the request is sent."""

    def __init__(self, host: str, *, context: ssl.SSLContext, timeout: float,
                 pins: tuple[str, ...]) -> None:
        super().__init__(host, timeout=timeout, context=context)
        self._pins = pins

    def connect(self) -> None:
        super().connect()
        if not self._pins:
            return
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True) or b""
        got = hashlib.sha256(der).hexdigest()
        if got not in self._pins:
            self.sock.close()
            raise TLSError(
                f"certificate of {self.host} has SHA-256 fingerprint {_colon(got)}, "
                f"which is not pinned",
                hint="if the host's certificate was replaced on purpose, update tls.fingerprints")


def _colon(hexdigest: str) -> str:
    return ":".join(hexdigest[i:i + 2] for i in range(0, len(hexdigest), 2)).upper()


def make_ssl_context(tls: TLSSpec, host: str) -> tuple[ssl.SSLContext, tuple[str, ...]]:
    """The context to talk to ``host`` and the fingerprints it must match (empty: CA check)."""
    pins = tls.pins_for(host)
    if tls.insecure:
        with _warn_lock:
            if host not in _warned_insecure:
                _warned_insecure.add(host)
                print(f"xenctl: WARNING: TLS verification is OFF for {host} (--insecure): anyone "
                      "on the path can read the pool password", file=sys.stderr)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx, ()
    if pins:
        # the pin replaces the CA chain: XenServer hosts use self-signed certificates
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx, pins
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    return ctx, ()


class XapiTransport(xmlrpc.client.Transport):
    """HTTPS (or, with ``insecure``, also plain HTTP) transport with verification, counting and
    no blind re-send. One connection, kept alive; not thread-safe (like the stdlib's)."""

    def __init__(self, url: str, tls: TLSSpec, stats: CallStats, *, timeout: float = 120.0) -> None:
        self.url = url
        self.scheme = urlsplit(url).scheme
        self.host = url_host(url)
        self.stats = stats
        self.timeout = timeout
        ctx, pins = make_ssl_context(tls, self.host) if self.scheme == "https" else \
            (ssl.create_default_context(), ())
        super().__init__()
        self.context = ctx
        self._pins = pins
        self._last_used = 0.0
        self.fresh_connection_for_next = False

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection[1] is not None and host == self._connection[0]:
            return self._connection[1]
        chost, self._extra_headers, _x509 = self.get_host_info(host)
        conn: http.client.HTTPConnection
        if self.scheme == "https":
            conn = _PinnedHTTPSConnection(chost, context=self.context, timeout=self.timeout,
                                          pins=self._pins)
        else:
            conn = http.client.HTTPConnection(chost, timeout=self.timeout)
        self._connection = host, conn
        return conn

    def request(self, host: Any, handler: str, request_body: Any, verbose: bool = False) -> Any:
        method = _method_of(bytes(request_body))
        self.stats.add(method)
        now = time.monotonic()
        # a mutating call goes on a connection that cannot have gone cold under us: a reset of a
        # kept-alive idle connection would otherwise be indistinguishable from a reset mid-call
        if self.fresh_connection_for_next or (not is_read_only(method) and now - self._last_used > 1.0):
            self.close()
            self.fresh_connection_for_next = False
        try:
            return self.single_request(host, handler, request_body, verbose)
        finally:
            self._last_used = time.monotonic()


def _method_of(body: bytes) -> str:
    start = body.find(b"<methodName>")
    end = body.find(b"</methodName>", start)
    if start < 0 or end < 0:
        return "?"
    return body[start + 12:end].decode("utf-8", "replace")


class _Proxy:
    """``xapi.xenapi.VM.get_record(ref)`` -> ``xapi.call("VM.get_record", ref)``."""

    def __init__(self, call: Callable[..., Any], name: str = "") -> None:
        self._call = call
        self._name = name

    def __getattr__(self, part: str) -> _Proxy:
        return _Proxy(self._call, f"{self._name}.{part}" if self._name else part)

    def __call__(self, *args: Any) -> Any:
        return self._call(self._name, *args)


@dataclass
class RetryPolicy:
    attempts: int = 8           # for TOO_MANY_PENDING_TASKS / HOST_STILL_BOOTING
    reset_attempts: int = 5     # for connection resets of read-only calls
    base_delay: float = 0.25
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        d: float = min(self.max_delay, self.base_delay * (2 ** attempt))
        return d * (0.75 + random.random() / 2)  # jitter so parallel workers do not march in step


class Xapi:
    """One logged-in session to the pool master (see module docstring)."""

    def __init__(self, url: str, username: str, password: Secret, tls: TLSSpec, *,
                 stats: CallStats | None = None, retry: RetryPolicy | None = None,
                 timeout: float = 120.0, local: bool = False, follow: bool = True) -> None:
        self.url = url
        self.follow = follow  # follow HOST_IS_SLAVE to the master
        self.username = username
        self._password = password
        self.tls = tls
        self.stats = stats if stats is not None else CallStats()
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.local = local  # slave_local login (emergency calls on a slave)
        self._session: Any = None
        self._transport: XapiTransport | None = None
        self.redirects: list[str] = []

    # ---------------------------------------------------------------- connection
    @property
    def host(self) -> str:
        return url_host(self.url)

    @property
    def handle(self) -> str:
        """The session reference (``OpaqueRef:...``), e.g. for ``session.get_*`` calls."""
        return str(getattr(self._session, "handle", "") or "")

    @property
    def xenapi(self) -> Any:
        return _Proxy(self.call)

    def login(self) -> Xapi:
        """Log in, following HOST_IS_SLAVE to the master (at most 3 hops)."""
        for _hop in range(4):
            if self._transport is not None:
                self._transport.close()
            self._transport = XapiTransport(self.url, self.tls, self.stats, timeout=self.timeout)
            session = XenAPI.Session(self.url, transport=self._transport)
            try:
                with map_xapi_errors(self.url):
                    self._with_reset_retry("session.login_with_password",
                                           functools.partial(self._login_on, session))
            except XenctlError as exc:
                self._transport.close()
                if not isinstance(exc, XapiError):
                    raise
                if exc.code == "HOST_IS_SLAVE" and exc.params and self.follow and not self.local:
                    master = exc.params[0]
                    log.info("%s is a pool member; its master is %s", self.host, master)
                    self.redirects.append(master)
                    self.url = replace_host(self.url, master)
                    continue
                raise
            self._session = session
            return self
        raise XapiConnectionError(f"too many HOST_IS_SLAVE redirects: {self.redirects}",
                                  hint="the pool is changing master; retry in a minute")

    def _login_on(self, session: Any) -> None:
        if self.local:
            session.slave_local_login_with_password(self.username, self._password.reveal())
        else:
            session.login_with_password(self.username, self._password.reveal(), API_VERSION,
                                        ORIGINATOR)

    def fork(self) -> Xapi:
        """A new session on its own connection (for another thread), same stats."""
        other = Xapi(self.url, self.username, self._password, self.tls, stats=self.stats,
                     retry=self.retry, timeout=self.timeout, local=self.local, follow=self.follow)
        return other.login()

    def logout(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        with suppress(Exception):  # best effort: the host may be gone (failover, eject)
            session.xenapi.session.logout()
        if self._transport is not None:
            self._transport.close()

    def close_connection(self) -> None:
        """Drop the HTTP connection (not the session); the next call reconnects."""
        if self._transport is not None:
            self._transport.close()

    def __enter__(self) -> Xapi:
        if self._session is None:
            self.login()
        return self

    def __exit__(self, *exc: object) -> None:
        self.logout()

    # ---------------------------------------------------------------- calls
    def call(self, method: str, *args: Any) -> Any:
        """Call ``method`` (e.g. ``"VM.get_record"``, ``"Async.VM.clone"``) with retries."""
        if self._session is None:
            raise XenctlError("internal: call before login")
        attempt = 0
        relogins = 0
        while True:
            try:
                with map_xapi_errors(self.url):
                    return self._with_reset_retry(method, lambda: self._raw(method, args))
            except TransientError as exc:
                if attempt >= self.retry.attempts:
                    raise
                delay = self.retry.delay(attempt)
                log.info("%s: %s, retrying in %.1fs", method, exc.code, delay)
                time.sleep(delay)
                attempt += 1
            except XapiError as exc:
                if (exc.code == "HOST_IS_SLAVE" and exc.params and relogins < 3 and self.follow
                        and not self.local):
                    # the master changed under us: nothing ran on the slave; go to the new master
                    relogins += 1
                    self.url = replace_host(self.url, exc.params[0])
                    self.redirects.append(exc.params[0])
                    self.login()
                    continue
                if exc.code == "SESSION_INVALID" and relogins < 1:
                    relogins += 1
                    self.login()
                    continue
                raise

    def _raw(self, method: str, args: tuple[Any, ...]) -> Any:
        target: Any = self._session.xenapi
        for part in method.split("."):
            target = getattr(target, part)
        return target(*args)

    def _with_reset_retry(self, method: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; on a dropped connection retry if ``method`` is read-only."""
        attempt = 0
        while True:
            try:
                return fn()
            except (TimeoutError, ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as exc:
                if isinstance(exc, XenctlError):
                    raise
                if not is_read_only(method):
                    raise XapiConnectionError(
                        f"connection to {self.host} dropped during {method}; it may or may not "
                        "have been applied",
                        hint="run the command again: xenctl converges from any state") from exc
                if attempt >= self.retry.reset_attempts:
                    raise
                if self._transport is not None:
                    self._transport.close()
                delay = self.retry.delay(attempt)
                log.info("%s: connection dropped (%s), retrying in %.1fs", method,
                         type(exc).__name__, delay)
                time.sleep(delay)
                attempt += 1


def connect(pool: PoolSpec, password: Secret, *, url: str | None = None,
            stats: CallStats | None = None, timeout: float = 120.0, local: bool = False) -> Xapi:
    """Log in to ``url`` (default: the pool's master), following HOST_IS_SLAVE."""
    if not password.reveal():
        raise CredentialsError("empty password")
    candidates = [url] if url else list(pool.all_hosts)
    first: XapiConnectionError | None = None
    for candidate in candidates:
        xapi = Xapi(candidate, pool.username, password, pool.tls, stats=stats, timeout=timeout,
                    local=local, retry=RetryPolicy(reset_attempts=1) if len(candidates) > 1 else None)
        try:
            xapi.login()
        except XapiConnectionError as exc:
            # the master may be down or moved: a member answers HOST_IS_SLAVE with the master
            log.info("%s unreachable (%s); trying the next pool host", candidate, exc)
            first = first or exc
            continue
        xapi.retry = RetryPolicy()
        return xapi
    assert first is not None
    if len(candidates) > 1:
        raise XapiConnectionError(
            f"no pool host answered as or pointed to a live master ({first.message})",
            hint="if the master died, promote a member: xenctl pool failover --emergency") from first
    raise first


@contextmanager
def session(pool: PoolSpec, password: Secret, **kw: Any) -> Iterator[Xapi]:
    xapi = connect(pool, password, **kw)
    try:
        yield xapi
    finally:
        xapi.logout()
