"""Errors raised by xenctl, and the one boundary where foreign errors become xenctl errors.

Hierarchy (every leaf also inherits the builtin it resembles, so callers may catch either)::

    XenctlError
    ├── SpecError(ValueError)              cloud.yml / flags / environment invalid
    ├── CredentialsError(PermissionError)  no password source, or authentication refused
    ├── TLSError(ConnectionError)          certificate not trusted / fingerprint mismatch
    ├── XapiConnectionError(ConnectionError)   host unreachable, connection dropped
    ├── XapiError                          XenAPI answered with a failure (code + params kept)
    │   ├── NotFoundError(LookupError)     HANDLE_INVALID, UUID_INVALID, ...
    │   ├── PowerStateError                VM_BAD_POWER_STATE, OTHER_OPERATION_IN_PROGRESS
    │   ├── CapacityError                  HOST_NOT_ENOUGH_FREE_MEMORY, NO_HOSTS_AVAILABLE, SR full
    │   ├── PoolError                      pool.join / eject / failover refusals
    │   └── TransientError                 TOO_MANY_PENDING_TASKS, HOST_STILL_BOOTING (retryable)
    ├── PlanError(ValueError)              the desired state cannot be reached (e.g. memory shortfall)
    ├── WaitTimeout(TimeoutError)          a VM never reported an IP in the CIDR, a host never came up
    └── Interrupted                        the run was interrupted (Ctrl-C, SIGTERM); a re-run converges

``map_xapi_errors()`` is the single translation point (after httpx's ``map_httpcore_exceptions``):
``XenAPI.Failure``, ``xmlrpc.client.Fault``, ``ssl.SSLError`` and ``OSError`` become the most
specific xenctl error, raised ``from`` the original, with the XenAPI code and parameters kept and a
hint saying what to do.
"""

from __future__ import annotations

import ssl
import xmlrpc.client
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import XenAPI

__all__ = [
    "CapacityError",
    "CredentialsError",
    "Interrupted",
    "NotFoundError",
    "PlanError",
    "PoolError",
    "PowerStateError",
    "SpecError",
    "TLSError",
    "TransientError",
    "WaitTimeout",
    "XapiConnectionError",
    "XapiError",
    "XenctlError",
    "error_for_code",
    "map_xapi_errors",
]


class XenctlError(Exception):
    """Root of every error xenctl raises on purpose. ``hint`` says what the user can do."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class SpecError(XenctlError, ValueError):
    """cloud.yml, a flag or an environment variable is invalid; the message names where."""


class CredentialsError(XenctlError, PermissionError):
    """No password could be obtained, or the pool refused the credentials."""

    def __init__(self, message: str, *, hint: str = "", code: str = "",
                 params: Sequence[str] = ()) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.params = [str(p) for p in params]


class TLSError(XenctlError, ConnectionError):
    """The server's certificate is not trusted (CA or pinned fingerprint)."""


class XapiConnectionError(XenctlError, ConnectionError):
    """The host could not be reached or dropped the connection."""


class PlanError(XenctlError, ValueError):
    """The desired state cannot be reached (nothing has been changed)."""


class WaitTimeout(XenctlError, TimeoutError):
    """Something did not happen within its time limit."""


class Interrupted(XenctlError):
    """The run was interrupted (Ctrl-C or SIGTERM) and stopped waiting; nothing half-done is lost:
    the next run finds and finishes or removes it."""

    hint = "run the same command again: xenctl converges from any state"


class XapiError(XenctlError):
    """XenAPI answered with a failure. ``code`` and ``params`` are exactly what the server sent."""

    def __init__(self, code: str, params: Sequence[str] = (), *, message: str = "",
                 hint: str = "") -> None:
        self.code = code
        self.params = [str(p) for p in params]
        text = message or (f"XenAPI error {code}" + (f" {self.params}" if self.params else ""))
        super().__init__(text, hint=hint or _HINTS.get(code, ""))


class NotFoundError(XapiError, LookupError):
    """An object the call referred to does not exist (any more)."""


class PowerStateError(XapiError):
    """The VM is in the wrong power state or busy with another operation."""


class CapacityError(XapiError):
    """The pool lacks memory, hosts or storage for the request."""


class PoolError(XapiError):
    """A pool operation (join, eject, master change) was refused."""


class TransientError(XapiError):
    """A failure worth retrying after a pause."""


_HINTS: dict[str, str] = {
    "SESSION_AUTHENTICATION_FAILED": "check the user name and password (XENCTL_PASSWORD or password_file)",
    "SESSION_INVALID": "the session expired and re-login failed; run the command again",
    "HOST_IS_SLAVE": "connect to the pool master (xenctl follows this automatically)",
    "HOST_NOT_ENOUGH_FREE_MEMORY": "free memory on the host, lower nodes.memory or add hosts",
    "NO_HOSTS_AVAILABLE": "no live, enabled host can run the VM; check `xenctl pool status`",
    "TOO_MANY_PENDING_TASKS": "the pool is busy; lower --concurrency or retry later",
    "HANDLE_INVALID": "the object was deleted meanwhile; run the command again",
    "UUID_INVALID": "check the uuid in cloud.yml",
    "VM_BAD_POWER_STATE": "the VM is in the wrong power state for this operation",
    "VM_IS_TEMPLATE": "the object is a template; nodes.template must name a template to clone",
    "VM_REQUIRES_SR": "the VM's disks are on an SR the host cannot reach; use a shared SR or pack placement",
    "VM_REQUIRES_NETWORK": "the network is not available on that host",
    "HOST_NOT_LIVE": "the host is down; check `xenctl pool status`",
    "HOST_DISABLED": "the host is disabled (maintenance); enable it or pick another host",
    "HOST_OFFLINE": "the host is down; check `xenctl pool status`",
    "JOINING_HOST_CANNOT_HAVE_RUNNING_VMS": "shut down the VMs on the joining host first",
    "JOINING_HOST_CANNOT_CONTAIN_SHARED_SRS": "detach shared SRs from the joining host first",
    "JOINING_HOST_CANNOT_BE_MASTER_OF_OTHER_HOSTS": "the joining host is already the master of a pool; eject its members first",
    "HOSTS_NOT_COMPATIBLE": "all hosts must run the same product version",
    "HOSTS_NOT_HOMOGENEOUS": "hosts differ in software or CPUs (pool.join_force overrides; not done automatically)",
    "POOL_JOINING_HOST_MUST_HAVE_SAME_API_VERSION": "upgrade the hosts to the same version",
    "POOL_JOINING_HOST_MUST_HAVE_SAME_DB_SCHEMA": "upgrade the hosts to the same version",
    "HA_IS_ENABLED": "disable HA on the pool first",
    "LICENCE_RESTRICTION": "the licence does not allow this (pool size or feature)",
    "OPERATION_NOT_ALLOWED": "XenAPI refused the operation in the current state",
    "MEMORY_CONSTRAINT_VIOLATION_ORDER": "memory limits must satisfy static_min <= dynamic_min <= dynamic_max <= static_max",
    "MEMORY_CONSTRAINT_VIOLATION_MAXPIN": "this pool needs dynamic_min = dynamic_max = static_max",
    "SR_BACKEND_FAILURE_44": "the SR is full; free space or choose another SR",
    "RBAC_PERMISSION_DENIED": "the user lacks the role for this call; use a pool-admin account",
    "HOST_STILL_BOOTING": "the host is starting (or lost its master); wait, or use `xenctl pool failover --emergency`",
}

_NOT_FOUND = {"HANDLE_INVALID", "UUID_INVALID", "VM_NOT_FOUND", "MESSAGE_METHOD_UNKNOWN"}
_POWER = {"VM_BAD_POWER_STATE", "OTHER_OPERATION_IN_PROGRESS", "OPERATION_BLOCKED",
          "VM_IS_TEMPLATE", "VM_LACKS_FEATURE", "VM_MISSING_PV_DRIVERS"}
_CAPACITY = {"HOST_NOT_ENOUGH_FREE_MEMORY", "NO_HOSTS_AVAILABLE", "SR_FULL",
             "HOST_NOT_ENOUGH_PCPUS", "SR_BACKEND_FAILURE_44"}
_TRANSIENT = {"TOO_MANY_PENDING_TASKS", "HOST_STILL_BOOTING", "VDI_IN_USE"}
_AUTH = {"SESSION_AUTHENTICATION_FAILED", "RBAC_PERMISSION_DENIED"}


def error_for_code(code: str, params: Sequence[str] = ()) -> XenctlError:
    """The most specific xenctl error for a XenAPI ``ErrorDescription``."""
    if code in _AUTH:
        text = (f"authentication failed for user {params[0] if params else '?'!r}"
                if code == "SESSION_AUTHENTICATION_FAILED"
                else f"XenAPI refused the call: {code} {list(params)}")
        # only the user name is kept: a server may echo what it was sent in the reason
        return CredentialsError(text, hint=_HINTS.get(code, ""), code=code, params=params[:1])
    cls: type[XapiError]
    if code in _NOT_FOUND:
        cls = NotFoundError
    elif code in _POWER:
        cls = PowerStateError
    elif code in _CAPACITY or code.startswith("SR_BACKEND_FAILURE_44"):
        cls = CapacityError
    elif code in _TRANSIENT:
        cls = TransientError
    elif (code.startswith(("POOL_", "JOINING_HOST", "HOSTS_NOT")) or code in {"HA_IS_ENABLED", "LICENCE_RESTRICTION", "HOST_IS_SLAVE", "CANNOT_CONTACT_HOST"}):
        cls = PoolError
    else:
        cls = XapiError
    return cls(code, params)


@contextmanager
def map_xapi_errors(what: str = "") -> Iterator[None]:
    """Translate XenAPI SDK, XML-RPC, TLS and socket errors into xenctl errors.

    ``what`` (e.g. ``"https://10.0.0.1"``) is put in connection messages so the user knows
    which host failed.
    """
    where = f" {what}" if what else ""
    try:
        yield
    except XenctlError:
        raise
    except XenAPI.Failure as exc:
        details = [str(d) for d in (exc.details or ["UNKNOWN"])]
        raise error_for_code(details[0], details[1:]) from exc
    except xmlrpc.client.Fault as exc:
        text = str(exc.faultString)
        if "SESSION_INVALID" in text or "valid session" in text:
            raise XapiError("SESSION_INVALID", [], message=f"session lost{where}: {text}") from exc
        raise XapiError("XMLRPC_FAULT", [str(exc.faultCode), text],
                        message=f"XML-RPC fault from{where or ' server'}: {exc.faultCode} {text}",
                        hint="the server sent a malformed or unexpected answer") from exc
    except xmlrpc.client.ProtocolError as exc:
        raise XapiConnectionError(
            f"HTTP {exc.errcode} {exc.errmsg} from{where or ' server'}",
            hint="check the URL: XenAPI is served on https://HOST/") from exc
    except ssl.SSLCertVerificationError as exc:
        raise TLSError(
            f"TLS certificate of{where or ' server'} not trusted: {getattr(exc, 'verify_message', None) or exc}",
            hint="give the pool's CA (tls.ca_file) or pin its SHA-256 fingerprint (tls.fingerprints); "
                 "--insecure only for throwaway labs") from exc
    except ssl.SSLError as exc:
        raise TLSError(f"TLS error with{where or ' server'}: {exc}",
                       hint="is the URL https:// and the port right?") from exc
    except TimeoutError as exc:
        raise XapiConnectionError(f"timed out talking to{where or ' server'}",
                                  hint="is the host up and reachable?") from exc
    except OSError as exc:
        raise XapiConnectionError(f"cannot reach{where or ' server'}: {exc.strerror or exc}",
                                  hint="is the host up, and the address and port right?") from exc
