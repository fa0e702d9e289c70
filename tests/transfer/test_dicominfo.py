"""The quick header walk (the uploader's scan and the node's validation) must never disagree
with pydicom: it either returns exactly what pydicom's inspection returns, or ``None`` (pydicom
then decides)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from transfer_helpers import make_series

from transfer.dicominfo import DicomInfo, inspect_fileobj, inspect_path, quick_info
from transfer.errors import ValidationError
from transfer.synth import generate_series


def _both(path: Path) -> tuple[DicomInfo | None, DicomInfo | None]:
    try:
        slow: DicomInfo | None = inspect_path(path)
    except ValidationError:
        slow = None
    with path.open("rb") as fp:
        return quick_info(fp, path.stat().st_size), slow


def test_agrees_with_pydicom_on_every_file_pydicom_ships() -> None:
    # Real files nobody here wrote: explicit and implicit VR, big endian, deflated, JPEG, RLE,
    # broken ones. Installed with pydicom (no download).
    root = Path(pydicom.data.__file__).parent / "test_files"
    files = sorted(f for f in root.rglob("*") if f.is_file())
    assert len(files) > 100
    vouched = 0
    for f in files:
        quick, slow = _both(f)
        if quick is not None:
            vouched += 1
            assert quick == slow, f.name
    # The walk handles most of them; the rest (deflated, big endian, undefined-length
    # sequences, broken files) go to pydicom.
    assert vouched > len(files) // 2


@pytest.mark.parametrize("kind", ["raw", "compressed"])
def test_handles_the_generated_series(tmp_path: Path, kind: str) -> None:
    for path in generate_series(tmp_path, slices=3, rows=64, cols=64, kind=kind):
        quick, slow = _both(path)
        assert quick is not None and quick == slow


def test_declines_every_truncation(tmp_path: Path) -> None:
    src = make_series(tmp_path, 1, rows=32, cols=32)[0]
    data = src.read_bytes()
    for cut in (100, 131, 140, 300, len(data) // 2, len(data) - 1):
        assert quick_info(io.BytesIO(data[:cut]), cut) is None, cut
        with pytest.raises(ValidationError):
            inspect_fileobj(io.BytesIO(data[:cut]), cut)


def test_declines_trailing_garbage_and_bad_uids(tmp_path: Path) -> None:
    src = make_series(tmp_path, 1, rows=8, cols=8)[0]
    data = src.read_bytes()
    assert quick_info(io.BytesIO(data + b"\x00" * 7), len(data) + 7) is None
    uid = pydicom.dcmread(src).SOPInstanceUID.encode()
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(data.replace(uid, uid[:-1] + b"x"))  # same length, not a UID any more
    quick, slow = _both(bad)
    assert quick is None and slow is None


def test_leaves_undefined_length_sequences_to_pydicom(tmp_path: Path) -> None:
    src = make_series(tmp_path, 1, rows=8, cols=8)[0]
    ds = pydicom.dcmread(src)
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([item])
    ds["ReferencedImageSequence"].is_undefined_length = True
    out = tmp_path / "seq.dcm"
    ds.save_as(out, enforce_file_format=True)
    quick, slow = _both(out)
    assert quick is None
    assert slow is not None and slow.sop_uid == ds.SOPInstanceUID
