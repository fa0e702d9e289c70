"""Node storage: atomic writes under a root, and a SQLite index by Study/Series/SOP UID.

Layout under the storage root::

    <study>/<series>/<sop>.dcm        DICOM objects
    objects/<sha[:2]>/<sha256>        other files (only when the client says so), by content hash
    .medstream/index.sqlite3          the index

Every write goes to ``.tmp-*`` in the destination directory, is fsynced, renamed into place and
the directory fsynced; the index only ever names complete, verified files. All methods block:
the daemon calls them from worker threads, never on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal

from transfer.dicominfo import DicomInfo, inspect_fileobj, inspect_walk_first, valid_uid
from transfer.errors import ConflictError, NotFoundError, StorageError, ValidationError

TMP_PREFIX = ".tmp-"
_TMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW  # read back for validation
_MEM_PARSE = 8 << 20  # files up to this size are validated from one read into memory
INDEX_DIR = ".medstream"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop TEXT PRIMARY KEY, study TEXT NOT NULL, series TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, path TEXT NOT NULL,
    name TEXT NOT NULL, transfer_syntax TEXT NOT NULL, modality TEXT NOT NULL,
    stored_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study, series);
CREATE TABLE IF NOT EXISTS objects (
    sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, path TEXT NOT NULL,
    name TEXT NOT NULL, stored_at REAL NOT NULL);
"""


def safe_name(name: str) -> str:
    """Normalise a client-supplied relative name, refusing anything that could escape a root.

    Refused: empty names, NUL or control characters, absolute paths (``/x``, ``\\\\x``,
    ``C:x``), and any ``..`` component. Backslashes count as separators (the 2013 client ran on
    Windows). Returns the name as a POSIX relative path.
    """
    if not name:
        raise ValidationError("refused name: empty")
    if "\x00" in name:
        raise ValidationError("refused name: contains a NUL byte")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValidationError(f"refused name {name!r}: contains control characters")
    if len(name.encode("utf-8", "surrogateescape")) > 1024:
        raise ValidationError("refused name: longer than 1024 bytes")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) >= 2 and unified[1] == ":"):
        raise ValidationError(f"refused name {name!r}: absolute paths are not allowed")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if not parts:
        raise ValidationError(f"refused name {name!r}: no file name")
    if any(p == ".." for p in parts):
        raise ValidationError(f"refused name {name!r}: '..' would escape the storage root")
    if any(p.startswith(TMP_PREFIX) or p == INDEX_DIR for p in parts):
        raise ValidationError(f"refused name {name!r}: reserved component")
    return str(PurePosixPath(*parts))


def inside(root: Path, candidate: Path) -> bool:
    """True when ``candidate`` (resolved, following symlinks) lies inside ``root``."""
    try:
        candidate.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _index_errors(what: str) -> Iterator[None]:
    """Translate SQLite failures (full disk, I/O error, corruption) into StorageError."""
    try:
        yield
    except sqlite3.Error as exc:
        text = str(exc)
        if "full" in text:
            raise StorageError(errno.ENOSPC, f"disk full while {what} (index: {text})") from None
        raise StorageError(errno.EIO, f"index error while {what}: {text}") from None


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(errno.ENOSPC, f"disk full while {what}")
    return StorageError(exc.errno or errno.EIO, f"I/O error while {what}: {exc.strerror or exc}")


def _pread_all(fd: int, size: int) -> bytes:
    data = os.pread(fd, size, 0)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, got)
        if not more:
            raise OSError(errno.EIO, f"short read: {got} of {size} bytes")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _hash_path(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fp:
        while chunk := fp.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


@dataclass(frozen=True, slots=True)
class CommitResult:
    status: Literal["stored", "exists"]
    sha256: str
    path: str  # relative to the root


class Upload:
    """One file being received: a temp file in its final directory, hashed as it is written."""

    def __init__(
        self,
        store: Store,
        *,
        kind: Literal["dicom", "other"],
        name: str,
        size: int,
        sha256: str,
        study: str = "",
        series: str = "",
        sop: str = "",
    ) -> None:
        self.store = store
        self.kind = kind
        self.name = name
        self.size = size
        self.expected_sha = sha256
        self.uids = (study, series, sop)
        if kind == "dicom":
            for uid in self.uids:
                if not valid_uid(uid):
                    raise ValidationError(f"refused: {uid[:70]!r} is not a valid DICOM UID")
            self.rel = PurePosixPath(study, series, f"{sop}.dcm")
        else:
            self.rel = PurePosixPath("objects", sha256[:2], sha256)
        self.final = store.root / self.rel
        self.dir = self.final.parent
        self._hash = hashlib.sha256()
        self.written = 0
        self._fd = -1
        self.tmp: Path | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not inside(store.root, self.dir):
                raise ValidationError(f"refused: {self.rel} escapes the storage root")
            self.tmp = self.dir / f"{TMP_PREFIX}{secrets.token_hex(8)}"
            self._fd = os.open(self.tmp, _TMP_FLAGS, 0o640)
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, f"creating a temp file for {self.rel}") from None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.written + len(data) > self.size:
            self.abort()
            raise ValidationError(f"body is longer than the declared {self.size} bytes")
        self._hash.update(data)
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self.abort()
            raise _storage_error(exc, f"writing {self.rel}") from None
        self.written += len(data)

    def _inspect(self) -> DicomInfo:
        """Check the header of what was written: the element walk of
        :func:`~transfer.dicominfo.quick_info` where it vouches for the file (well formed,
        little endian, every element inside the file, valid UIDs: it never disagrees with
        pydicom, and costs about a fiftieth), else pydicom, which decides and words the error.
        (pydicom alone was about half of the node's CPU per 220 KB CT slice.) A file of up to
        ``_MEM_PARSE`` bytes is read back with one ``pread`` and walked in memory: pydicom
        seeks over every deferred value, and on a file each seek is an ``lseek`` (about 80 for
        a CT slice), each of them a hand-over of the GIL between this worker and the event
        loop."""
        assert self.tmp is not None
        if self.size <= _MEM_PARSE:
            try:
                data = _pread_all(self._fd, self.size)
            except OSError as exc:
                raise _storage_error(exc, f"reading back {self.rel}") from None
            return inspect_walk_first(io.BytesIO(data), self.size)
        with open(self.tmp, "rb") as fp:
            return inspect_walk_first(fp, self.size)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.tmp is not None:
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass
            self.tmp = None

    def commit(self) -> CommitResult:
        """Verify size and digest, validate the DICOM header, then rename into place."""
        try:
            if self._fd < 0 or self.tmp is None:
                raise StorageError(errno.EIO, "upload already aborted")
            if self.written != self.size:
                raise ValidationError(f"body has {self.written} bytes, the header said {self.size}")
            digest = self._hash.hexdigest()
            if digest != self.expected_sha:
                raise ValidationError(
                    f"sha256 mismatch: received {digest}, the header said {self.expected_sha}"
                )
            info: DicomInfo | None = None
            if self.kind == "dicom":
                info = self._inspect()
                if (info.study_uid, info.series_uid, info.sop_uid) != self.uids:
                    raise ValidationError(
                        "UIDs in the file do not match the header "
                        f"(file has sop {info.sop_uid}, header {self.uids[2]})"
                    )
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise _storage_error(exc, f"syncing {self.rel}") from None
            os.close(self._fd)
            self._fd = -1
            return self.store._commit(self, digest, info)
        finally:
            self.abort()


class Store:
    """The storage root and its index. Thread-safe; every method blocks."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / INDEX_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise _storage_error(exc, f"creating the storage root {self.root}") from None
        self._lock = threading.Lock()
        with _index_errors(f"opening the index in {self.root / INDEX_DIR}"):
            self._db = sqlite3.connect(
                self.root / INDEX_DIR / "index.sqlite3",
                check_same_thread=False,
                isolation_level=None,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self.removed_temps = self._clean_temps()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _clean_temps(self) -> int:
        """Remove temp files left by a crash (they were never visible in the index), and index
        complete files that a crash left without their row (see :meth:`_reindex`)."""
        n = 0
        self.reindexed = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d != INDEX_DIR]
            for f in filenames:
                if f.startswith(TMP_PREFIX):
                    try:
                        os.unlink(os.path.join(dirpath, f))
                        n += 1
                    except OSError:
                        pass
                elif self._reindex(Path(dirpath, f)):
                    self.reindexed += 1
        return n

    def _reindex(self, path: Path) -> bool:
        """Index one file of our layout that the index does not know; True if it was.

        A crash between the rename and the index commit leaves a complete, verified file
        without its row. It is indexed again if it still checks out: a DICOM object whose UIDs
        match its ``<study>/<series>/<sop>.dcm`` path, or an object whose SHA-256 is its name.
        Anything else is left alone and never served. A known file costs one key lookup.
        """
        parts = path.relative_to(self.root).parts
        try:
            if len(parts) == 3 and parts[0] == "objects" and len(parts[2]) == 64:
                return self._reindex_object(path, parts)
            if len(parts) == 3 and parts[2].endswith(".dcm"):
                return self._reindex_instance(path, parts)
        except (ValidationError, OSError, sqlite3.Error):
            pass
        return False

    def _reindex_object(self, path: Path, parts: tuple[str, ...]) -> bool:
        with self._lock:
            if self._db.execute("SELECT 1 FROM objects WHERE sha256=?", (parts[2],)).fetchone():
                return False
        size, digest = _hash_path(path)
        if digest != parts[2] or parts[1] != digest[:2]:
            return False
        with self._lock:
            self._db.execute(
                "INSERT INTO objects VALUES (?,?,?,?,?)",
                (digest, size, "/".join(parts), "", time.time()),
            )
        return True

    def _reindex_instance(self, path: Path, parts: tuple[str, ...]) -> bool:
        study, series, sop = parts[0], parts[1], parts[2][: -len(".dcm")]
        if not (valid_uid(study) and valid_uid(series) and valid_uid(sop)):
            return False
        with self._lock:
            if self._db.execute("SELECT 1 FROM instances WHERE sop=?", (sop,)).fetchone():
                return False
        size, digest = _hash_path(path)
        with open(path, "rb") as fp:
            info = inspect_fileobj(fp, size)
        if (info.study_uid, info.series_uid, info.sop_uid) != (study, series, sop):
            return False
        with self._lock:
            self._db.execute(
                "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    sop,
                    study,
                    series,
                    digest,
                    size,
                    "/".join(parts),
                    parts[2],
                    info.transfer_syntax,
                    info.modality,
                    time.time(),
                ),
            )
        return True

    # ------------------------------------------------------------------ writing
    def begin(
        self,
        *,
        kind: Literal["dicom", "other"],
        name: str,
        size: int,
        sha256: str,
        study: str = "",
        series: str = "",
        sop: str = "",
    ) -> Upload:
        safe_name(name)
        return Upload(
            self,
            kind=kind,
            name=name,
            size=size,
            sha256=sha256,
            study=study,
            series=series,
            sop=sop,
        )

    def _commit(self, up: Upload, digest: str, info: DicomInfo | None) -> CommitResult:
        """Index and rename in one step: the row is inserted in a transaction, the file renamed
        into place, then the transaction committed. If the index cannot be written (a full
        disk), the rename is undone: a file is visible only once it is indexed."""
        assert up.tmp is not None
        rel = str(up.rel)
        now = time.time()
        with self._lock, _index_errors(f"indexing {rel}"):
            if info is not None:
                row = self._db.execute(
                    "SELECT sha256 FROM instances WHERE sop=?", (info.sop_uid,)
                ).fetchone()
            else:
                row = self._db.execute(
                    "SELECT sha256 FROM objects WHERE sha256=?", (digest,)
                ).fetchone()
            if row is not None:
                if row[0] == digest:
                    return CommitResult("exists", digest, rel)
                raise ConflictError(
                    f"conflict: SOP Instance UID {info.sop_uid if info else '?'} is already stored "
                    f"with different content (sha256 {row[0]}); refusing to overwrite"
                )
            self._db.execute("BEGIN IMMEDIATE")
            renamed = False
            try:
                if info is not None:
                    self._db.execute(
                        "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (
                            info.sop_uid,
                            info.study_uid,
                            info.series_uid,
                            digest,
                            up.size,
                            rel,
                            up.name,
                            info.transfer_syntax,
                            info.modality,
                            now,
                        ),
                    )
                else:
                    self._db.execute(
                        "INSERT INTO objects VALUES (?,?,?,?,?)",
                        (digest, up.size, rel, up.name, now),
                    )
                try:
                    os.rename(up.tmp, up.final)
                    renamed = True
                    up.tmp = None
                    fsync_dir(up.final.parent)
                except OSError as exc:
                    raise _storage_error(exc, f"renaming {rel} into place") from None
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if renamed:
                    with contextlib.suppress(OSError):
                        os.unlink(up.final)
                raise
            return CommitResult("stored", digest, rel)

    def put_bytes(
        self, data: bytes, *, name: str, kind: Literal["dicom", "other"] | None = None
    ) -> CommitResult:
        """Store a whole in-memory object (the erl3d path). ``kind=None`` sniffs DICOM."""
        digest = hashlib.sha256(data).hexdigest()
        info: DicomInfo | None = None
        if kind != "other":
            try:
                info = inspect_fileobj(io.BytesIO(data), len(data))
            except ValidationError:
                if kind == "dicom":
                    raise
        up = self.begin(
            kind="dicom" if info else "other",
            name=name,
            size=len(data),
            sha256=digest,
            study=info.study_uid if info else "",
            series=info.series_uid if info else "",
            sop=info.sop_uid if info else "",
        )
        up.write(data)
        return up.commit()

    # ------------------------------------------------------------------ reading
    def have(self, items: Iterable[dict[str, Any]]) -> list[bool]:
        """For each ``{"sop": uid, "sha256": hex}`` or ``{"sha256": hex}``: is it stored as is?"""
        out: list[bool] = []
        with self._lock, _index_errors("reading the index"):
            for it in items:
                sop = it.get("sop") if isinstance(it, dict) else None
                sha = it.get("sha256") if isinstance(it, dict) else None
                if sop:
                    row = self._db.execute(
                        "SELECT sha256 FROM instances WHERE sop=?", (sop,)
                    ).fetchone()
                else:
                    row = self._db.execute(
                        "SELECT sha256 FROM objects WHERE sha256=?", (sha,)
                    ).fetchone()
                out.append(row is not None and row[0] == sha)
        return out

    def list(
        self,
        *,
        study: str | None = None,
        series: str | None = None,
        sop: str | None = None,
        limit: int = 100000,
    ) -> list[dict[str, Any]]:
        q = "SELECT sop, study, series, sha256, size, path, name, transfer_syntax, modality, stored_at FROM instances"
        conds: list[str] = []
        args: list[Any] = []
        for col, val in (("study", study), ("series", series), ("sop", sop)):
            if val:
                conds.append(f"{col}=?")
                args.append(val)
        if conds:
            q += " WHERE " + " AND ".join(conds)
        q += " ORDER BY study, series, path LIMIT ?"
        args.append(limit)
        cols = (
            "sop",
            "study",
            "series",
            "sha256",
            "size",
            "path",
            "name",
            "transfer_syntax",
            "modality",
            "stored_at",
        )
        with self._lock, _index_errors("reading the index"):
            rows = self._db.execute(q, args).fetchall()
            out = [dict(zip(cols, r, strict=True)) | {"kind": "dicom"} for r in rows]
            if not (study or series or sop):
                for r in self._db.execute(
                    "SELECT sha256, size, path, name, stored_at FROM objects ORDER BY name LIMIT ?",
                    (limit,),
                ):
                    out.append(
                        dict(zip(("sha256", "size", "path", "name", "stored_at"), r, strict=True))
                        | {"kind": "other"}
                    )
        return out

    def stat(self, *, sop: str | None = None, sha256: str | None = None) -> dict[str, Any]:
        if sop:
            found = self.list(sop=sop, limit=1)
            if found:
                return found[0]
            raise NotFoundError(f"no instance with SOP Instance UID {sop}")
        if sha256:
            with self._lock, _index_errors("reading the index"):
                r = self._db.execute(
                    "SELECT sha256, size, path, name, stored_at FROM objects WHERE sha256=?",
                    (sha256,),
                ).fetchone()
            if r is None:
                raise NotFoundError(f"no object with sha256 {sha256}")
            return dict(zip(("sha256", "size", "path", "name", "stored_at"), r, strict=True)) | {
                "kind": "other"
            }
        raise NotFoundError("stat needs a SOP Instance UID or a sha256")

    def summary(self) -> dict[str, Any]:
        with self._lock, _index_errors("reading the index"):
            n, size = self._db.execute(
                "SELECT count(*), coalesce(sum(size),0) FROM instances"
            ).fetchone()
            studies = self._db.execute("SELECT count(DISTINCT study) FROM instances").fetchone()[0]
            on, osize = self._db.execute(
                "SELECT count(*), coalesce(sum(size),0) FROM objects"
            ).fetchone()
        return {
            "instances": n,
            "bytes": size,
            "studies": studies,
            "objects": on,
            "object_bytes": osize,
        }

    def open_object(self, rel: str, size: int) -> BinaryIO:
        """Open a stored file for reading; refuse paths outside the root and files whose size
        no longer matches the index (a clear error before any byte is sent)."""
        path = self.root / rel
        if not inside(self.root, path):
            raise ValidationError(f"refused: {rel} escapes the storage root")
        try:
            fp = open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise NotFoundError(f"no stored file {rel} (indexed, but missing on disk)") from None
        except OSError as exc:
            raise _storage_error(exc, f"opening {rel}") from None
        actual = os.fstat(fp.fileno()).st_size
        if actual != size:
            fp.close()
            raise StorageError(
                errno.EIO, f"stored file {rel} has {actual} bytes, the index says {size}"
            )
        return fp
