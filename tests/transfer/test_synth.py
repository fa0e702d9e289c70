"""The synthetic CT series generator: valid DICOM, one study/series, CT-like compressibility."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zstandard
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless

from transfer.synth import SynthError, generate_series

# Attributes the CT Image IOD requires (type 1/2) across its mandatory modules.
REQUIRED = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Manufacturer",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
    "ImageType",
    "RescaleIntercept",
    "RescaleSlope",
    "KVP",
    "AcquisitionNumber",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
]


def test_small_raw_series_is_a_valid_ct_series(tmp_path: Path) -> None:
    paths = generate_series(tmp_path, slices=6, rows=64, cols=48, kind="raw", seed=3)
    assert [p.name for p in paths] == [f"CT{i:04d}.dcm" for i in range(1, 7)]
    datasets = [pydicom.dcmread(p) for p in paths]
    for i, ds in enumerate(datasets):
        missing = [k for k in REQUIRED if k not in ds]
        assert not missing, missing
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.Modality == "CT" and ds.InstanceNumber == i + 1
        arr = ds.pixel_array
        assert arr.shape == (64, 48) and arr.dtype == np.uint16
        assert ds.BitsAllocated == 16 and int(arr.max()) < (1 << ds.BitsStored)
    assert len({ds.SOPInstanceUID for ds in datasets}) == 6
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    # Slices are stacked along z, one millimetre apart.
    zs = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(zs), -1.0)


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = generate_series(tmp_path / "a", slices=2, rows=32, cols=32, seed=7)
    b = generate_series(tmp_path / "b", slices=2, rows=32, cols=32, seed=7)
    c = generate_series(tmp_path / "c", slices=2, rows=32, cols=32, seed=8)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    assert pydicom.dcmread(a[0]).SOPInstanceUID != pydicom.dcmread(c[0]).SOPInstanceUID


def test_full_size_raw_slice_is_ct_like(tmp_path: Path) -> None:
    paths = generate_series(tmp_path, slices=3, rows=640, cols=640, kind="raw")
    for p in paths:
        data = p.read_bytes()
        assert 819_200 < len(data) < 825_000
        ratio = len(data) / len(zstandard.ZstdCompressor(level=1).compress(data))
        assert 1.6 < ratio < 3.2, ratio  # neither zeros nor random bytes
    hu = pydicom.dcmread(paths[1]).pixel_array.astype(np.int32) - 1024
    assert 0 <= int(np.median(hu[300:340, 300:340])) <= 100  # soft tissue at the centre
    assert (hu > 600).sum() > 500  # some bone
    assert hu[0, 0] == -1024  # padding outside the field of view


def test_compressed_kind_is_rle_near_220_kb_and_decodes(tmp_path: Path) -> None:
    paths = generate_series(tmp_path, slices=3, rows=640, cols=640, kind="compressed")
    for p in paths:
        assert 170_000 < p.stat().st_size < 270_000, p.stat().st_size
        ds = pydicom.dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        arr = ds.pixel_array
        assert arr.shape == (640, 640)
        assert 1024 <= int(np.median(arr[300:340, 300:340])) <= 1124  # soft tissue


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SynthError, match="kind"):
        generate_series(tmp_path, slices=1, kind="jpeg")
    with pytest.raises(SynthError, match="slices"):
        generate_series(tmp_path, slices=0)
    with pytest.raises(SynthError, match="rows"):
        generate_series(tmp_path, slices=1, rows=4)


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "s"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "transfer.synth",
            str(out),
            "--slices",
            "2",
            "--rows",
            "32",
            "--cols",
            "32",
            "--kind",
            "compressed",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "wrote 2 compressed slices" in res.stdout
    assert len(list(out.glob("*.dcm"))) == 2
    bad = subprocess.run(
        [sys.executable, "-m", "transfer.synth", str(out), "--slices", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "slices must be" in bad.stderr
