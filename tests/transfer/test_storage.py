"""Storage: names, atomic commits, the index, conflicts, DICOM validation, a full disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_helpers import make_series, pydicom_sample

from transfer import dicominfo, storage
from transfer.dicominfo import DicomInfo, inspect_path
from transfer.errors import ConflictError, StorageError, ValidationError
from transfer.storage import Store, safe_name
from transfer.synth import generate_series

GOOD = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "image_dfl.dcm",
    "JPEG2000.dcm",
    "rtplan.dcm",
    "waveform_ecg.dcm",
    "liver_1frame.dcm",
]
BROKEN = {
    "MR_truncated.dcm": "truncated",
    "rtplan_truncated.dcm": "truncated",
    "no_meta.dcm": "DICM",
    "meta_missing_tsyntax.dcm": "Transfer Syntax",
    "README.txt": "not a valid DICOM file",
}


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "empty"),
        ("a\x00b", "NUL"),
        ("/etc/passwd", "absolute"),
        ("\\\\server\\share", "absolute"),
        ("C:\\Windows\\x", "absolute"),
        ("c:x", "absolute"),
        ("../x", "escape"),
        ("a/../../x", "escape"),
        ("a\\..\\..\\x", "escape"),
        ("a/\x07b", "control"),
        ("./.", "no file name"),
        (".tmp-123", "reserved"),
        (".medstream/index.sqlite3", "reserved"),
    ],
)
def test_safe_name_refuses(name: str, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        safe_name(name)


def test_safe_name_normalises() -> None:
    assert safe_name("a/./b//c.dcm") == "a/b/c.dcm"
    assert safe_name("dir\\sub\\x.dcm") == "dir/sub/x.dcm"
    assert safe_name("CT 1.2.3 é.dcm") == "CT 1.2.3 é.dcm"


@pytest.mark.parametrize("name", GOOD)
def test_pydicom_samples_validate(name: str) -> None:
    info = inspect_path(pydicom_sample(name))
    assert info.sop_uid and info.study_uid and info.series_uid


@pytest.mark.parametrize(("name", "match"), sorted(BROKEN.items()))
def test_broken_files_are_refused_with_a_reason(name: str, match: str) -> None:
    with pytest.raises(ValidationError, match=match) as ei:
        inspect_path(pydicom_sample(name))
    assert "\n" not in str(ei.value)


def _put(store: Store, path: Path, data: bytes | None = None) -> str:
    info = inspect_path(path)
    body = path.read_bytes() if data is None else data
    up = store.begin(
        kind="dicom",
        name=path.name,
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        study=info.study_uid,
        series=info.series_uid,
        sop=info.sop_uid,
    )
    half = len(body) // 2
    up.write(body[:half])
    up.write(body[half:])
    return up.commit().status


def visible_files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and ".medstream" not in p.parts
    )


def test_commit_layout_index_exists_and_conflict(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    src = pydicom_sample("CT_small.dcm")
    info = inspect_path(src)
    assert _put(store, src) == "stored"
    rel = f"{info.study_uid}/{info.series_uid}/{info.sop_uid}.dcm"
    assert (store.root / rel).read_bytes() == src.read_bytes()
    assert visible_files(store.root) == [rel]
    assert _put(store, src) == "exists"  # identical re-send: a no-op
    # Same SOP Instance UID, different bytes: a conflict, and the stored file is untouched.
    altered = bytearray(src.read_bytes())
    altered[-1] ^= 0xFF
    bad = tmp_path / "altered.dcm"
    bad.write_bytes(altered)
    with pytest.raises(ConflictError, match="already stored with different content"):
        _put(store, bad)
    assert (store.root / rel).read_bytes() == src.read_bytes()
    assert visible_files(store.root) == [rel]  # no temp left behind
    rows = store.list(study=info.study_uid)
    assert [r["sop"] for r in rows] == [info.sop_uid]
    assert store.stat(sop=info.sop_uid)["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.have(
        [{"sop": info.sop_uid, "sha256": rows[0]["sha256"]}, {"sop": "1.2", "sha256": "0"}]
    ) == [True, False]
    store.close()
    # The index survives a restart.
    again = Store(tmp_path / "root")
    assert again.summary()["instances"] == 1


def test_digest_size_and_uid_mismatches_leave_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    src = pydicom_sample("MR_small.dcm")
    data = src.read_bytes()
    info = inspect_path(src)
    up = store.begin(
        kind="dicom",
        name="x",
        size=len(data),
        sha256="0" * 64,
        study=info.study_uid,
        series=info.series_uid,
        sop=info.sop_uid,
    )
    up.write(data)
    with pytest.raises(ValidationError, match="sha256 mismatch"):
        up.commit()
    up = store.begin(
        kind="dicom",
        name="x",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        study=info.study_uid,
        series=info.series_uid,
        sop="1.2.3.999",
    )
    up.write(data)
    with pytest.raises(ValidationError, match="do not match"):
        up.commit()
    up = store.begin(
        kind="dicom",
        name="x",
        size=len(data) + 1,
        sha256=hashlib.sha256(data).hexdigest(),
        study=info.study_uid,
        series=info.series_uid,
        sop=info.sop_uid,
    )
    up.write(data)
    with pytest.raises(ValidationError, match="bytes"):
        up.commit()
    assert visible_files(store.root) == []
    assert store.summary()["instances"] == 0


@pytest.mark.parametrize("read_back", ["in memory", "from the file"])
@pytest.mark.parametrize("name", GOOD + sorted(BROKEN))
def test_commit_validates_what_was_written_in_memory_or_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, read_back: str
) -> None:
    """The node validates a file of up to _MEM_PARSE bytes from one read back into memory, a
    larger one from the file: both judge every pydicom sample, good or broken, the same way, and
    as pydicom does on the original file."""
    if read_back == "from the file":
        monkeypatch.setattr(storage, "_MEM_PARSE", 0)
    else:
        assert storage._MEM_PARSE >= 1 << 20
    src = pydicom_sample(name)
    data = src.read_bytes()
    try:
        expected: DicomInfo | str = inspect_path(src)
    except ValidationError as exc:
        expected = str(exc)
    uids = (
        (expected.study_uid, expected.series_uid, expected.sop_uid)
        if isinstance(expected, DicomInfo)
        else ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    )
    store = Store(tmp_path / "root")
    up = store.begin(
        kind="dicom",
        name=name,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        study=uids[0],
        series=uids[1],
        sop=uids[2],
    )
    up.write(data)
    if isinstance(expected, str):
        with pytest.raises(ValidationError) as ei:
            up.commit()
        assert str(ei.value) == expected
        assert visible_files(store.root) == []
    else:
        assert up.commit().status == "stored"
        row = store.stat(sop=expected.sop_uid)
        assert row["transfer_syntax"] == expected.transfer_syntax
        assert (store.root / row["path"]).read_bytes() == data


@pytest.mark.parametrize("read_back", ["in memory", "from the file"])
def test_commit_asks_pydicom_only_about_files_the_walk_cannot_vouch_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_back: str
) -> None:
    """Plain little-endian slices (the generated CT series, raw and RLE) are checked by the
    element walk alone; a big-endian file, which the walk declines, goes to pydicom, once."""
    if read_back == "from the file":
        monkeypatch.setattr(storage, "_MEM_PARSE", 0)
    asked: list[int] = []
    real = dicominfo.inspect_fileobj

    committing = [False]  # count what the commit asks, not the test's own header reads
    commit = storage.Upload.commit

    def counted(fp: object, size: int) -> DicomInfo:
        if committing[0]:
            asked.append(size)
        return real(fp, size)  # type: ignore[arg-type]

    def watched(up: storage.Upload) -> storage.CommitResult:
        committing[0] = True
        try:
            return commit(up)
        finally:
            committing[0] = False

    monkeypatch.setattr(dicominfo, "inspect_fileobj", counted)
    monkeypatch.setattr(storage, "inspect_fileobj", counted)  # however storage reaches pydicom
    monkeypatch.setattr(storage.Upload, "commit", watched)
    files = [
        *generate_series(tmp_path / "raw", slices=2, rows=32, cols=32, kind="raw"),
        *generate_series(tmp_path / "rle", slices=2, rows=32, cols=32, kind="compressed"),
    ]
    store = Store(tmp_path / "root")
    assert [_put(store, f) for f in files] == ["stored"] * 4
    assert asked == []
    big = pydicom_sample("MR_small_bigendian.dcm")
    assert _put(store, big) == "stored"
    assert asked == [big.stat().st_size]


def test_other_files_by_content_hash(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    res = store.put_bytes(b"report text", name="notes/report.txt", kind="other")
    sha = hashlib.sha256(b"report text").hexdigest()
    assert res.status == "stored" and res.path == f"objects/{sha[:2]}/{sha}"
    assert store.put_bytes(b"report text", name="other-name.txt", kind="other").status == "exists"
    assert store.stat(sha256=sha)["name"] == "notes/report.txt"
    with pytest.raises(ValidationError, match="escape"):
        store.begin(kind="other", name="../../x", size=1, sha256=sha)


def test_stale_temps_are_removed_on_start(tmp_path: Path) -> None:
    d = tmp_path / "root" / "1.2" / "3.4"
    d.mkdir(parents=True)
    (d / ".tmp-deadbeef").write_bytes(b"partial")
    store = Store(tmp_path / "root")
    assert store.removed_temps == 1 and not (d / ".tmp-deadbeef").exists()


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "600k") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_mid_file_leaves_nothing_partial(tmp_path: Path) -> None:
    files = make_series(tmp_path / "series", 4, rows=256, cols=256)  # ~130 KB each
    with tiny_tmpfs(tmp_path / "disk", "300k") as disk:
        store = Store(disk)
        statuses = []
        errors = []
        for f in files:
            try:
                statuses.append(_put(store, f))
            except StorageError as exc:
                errors.append(str(exc))
        assert statuses and errors, (statuses, errors)
        assert all("disk full" in e for e in errors)
        stored = visible_files(disk)
        assert len(stored) == len(statuses)
        for rel in stored:  # every visible file is complete and indexed
            assert (disk / rel).stat().st_size == files[0].stat().st_size
        assert store.summary()["instances"] == len(statuses)
        assert not [p for p in disk.rglob(".tmp-*")]
        store.close()


def fill(path: Path) -> None:
    """Fill the file system holding ``path`` until it reports ENOSPC."""
    block = b"\xff" * 4096
    with contextlib.suppress(OSError), open(path / "filler", "wb", buffering=0) as fp:
        for _ in range(1 << 20):  # bounded: 4 GiB at most, a tiny tmpfs fills long before
            fp.write(block)
    assert (path / "filler").stat().st_size > 0


@contextlib.contextmanager
def index_disk_full(root: Path) -> Iterator[Store]:
    """A store whose index (``.medstream``) lives on its own tiny tmpfs, filled to the brim."""
    (root / ".medstream").mkdir(parents=True)
    with tiny_tmpfs(root / ".medstream", "256k") as idx:
        store = Store(root)
        try:
            fill(idx)
            yield store
        finally:
            store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_index_disk_full_is_a_storage_error_and_leaves_nothing_visible(tmp_path: Path) -> None:
    files = make_series(tmp_path / "series", 1)
    root = tmp_path / "root"
    with index_disk_full(root) as store:
        with pytest.raises(StorageError, match="disk full"):
            _put(store, files[0])
        # Not indexed means not visible: no file at its final path, no temp file left.
        assert visible_files(root) == []
        assert not list(root.rglob(".tmp-*"))
        assert store.summary()["instances"] == 0  # reads still work


def test_unindexed_files_are_validated_and_reindexed_at_start(tmp_path: Path) -> None:
    """A crash between the rename and the index commit leaves a complete file without its row:
    the next start indexes it again (after re-checking it), so list/get see it."""
    import sqlite3

    files = make_series(tmp_path / "s", 2)
    root = tmp_path / "root"
    store = Store(root)
    for f in files:
        _put(store, f)
    up = store.begin(kind="other", name="n.txt", size=5, sha256=hashlib.sha256(b"hello").hexdigest())
    up.write(b"hello")
    up.commit()
    before = {r["sop"] if r["kind"] == "dicom" else r["sha256"]: r for r in store.list()}
    store.close()
    db = sqlite3.connect(root / ".medstream" / "index.sqlite3")
    db.execute("DELETE FROM instances")
    db.execute("DELETE FROM objects")
    db.commit()
    db.close()
    # Files that are not ours are left alone and not indexed.
    (root / "1.2.3").mkdir()
    (root / "1.2.3" / "junk.dcm").write_bytes(b"not dicom")
    bad = root / "1.2" / "3.4"
    bad.mkdir(parents=True)
    (bad / "5.6.dcm").write_bytes(files[0].read_bytes())  # UIDs in the file do not match the path
    store = Store(root)
    assert store.reindexed == 3
    after = {r["sop"] if r["kind"] == "dicom" else r["sha256"]: r for r in store.list()}
    assert set(after) == set(before)
    for k, r in before.items():
        assert {x: after[k][x] for x in ("sha256", "size", "path")} == {
            x: r[x] for x in ("sha256", "size", "path")
        }
    assert (root / "1.2.3" / "junk.dcm").exists() and (bad / "5.6.dcm").exists()
    store.close()
