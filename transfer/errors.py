"""The one exception root of the ``transfer`` package and its leaves."""

from __future__ import annotations

from pathlib import Path


class TransferError(Exception):
    """Root of every error this package raises on purpose."""


class ProtocolError(TransferError):
    """The native wire protocol was violated (by us or by the peer)."""

    def __init__(self, message: str, *, code: str = "protocol") -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow in this state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of order."""


class AuthError(TransferError, PermissionError):
    """Wrong or missing token, or TLS identity refused."""


class ValidationError(TransferError, ValueError):
    """A file, name or UID was refused (bad DICOM, path escaping the root, NUL bytes...)."""


class ConflictError(TransferError):
    """Same SOP Instance UID with different bytes than what is already stored."""


class StorageError(TransferError, OSError):
    """Writing or reading the node's storage failed (disk full, I/O error)."""


class NotFoundError(TransferError, LookupError):
    """No such study, series, instance or object."""


class ConfigError(TransferError, ValueError):
    """Bad configuration (file, flag or environment)."""


class NodeError(TransferError, ConnectionError):
    """A node could not be reached or dropped the connection."""


class IncompleteFetch(NodeError):
    """A get wrote what it could, but objects are missing or a node could not be asked.

    ``paths`` holds the files that were written (complete and digest-checked)."""

    def __init__(self, message: str, paths: list[Path]) -> None:
        super().__init__(message)
        self.paths = paths
