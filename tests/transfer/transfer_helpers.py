"""Helpers for the transfer tests (imported by name: tests/transfer is on sys.path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from transfer.config import DaemonConfig


def pydicom_sample(name: str) -> Path:
    """A sample file shipped inside pydicom, by explicit name (never the pattern form, never a
    download: both would try the network, which hangs offline)."""
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        raise FileNotFoundError(f"pydicom test file {name} is not installed")
    return Path(found)


def write_ct(
    path: Path,
    *,
    study: str,
    series: str,
    sop: str,
    rows: int = 16,
    cols: int = 16,
    seed: int = 0,
    index: int = 0,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "T0001"
    ds.InstanceNumber = index + 1
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    rng = np.random.default_rng(seed * 100003 + index)
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_series(out: Path, n: int, *, rows: int = 16, cols: int = 16, seed: int = 0) -> list[Path]:
    study = generate_uid(entropy_srcs=[f"study-{seed}"])
    series = generate_uid(entropy_srcs=[f"series-{seed}"])
    return [
        write_ct(
            out / f"slice{i:04d}.dcm",
            study=study,
            series=series,
            sop=generate_uid(entropy_srcs=[f"sop-{seed}-{i}"]),
            rows=rows,
            cols=cols,
            seed=seed,
            index=i,
        )
        for i in range(n)
    ]


def node_config(root: Path, pki_dir: Path | None, **kw: object) -> DaemonConfig:
    cfg = DaemonConfig(bind="127.0.0.1", port=0, storage_root=str(root), idle_timeout=10.0)
    if pki_dir is None:
        cfg.insecure_plaintext = True
    else:
        cfg.tls_cert = str(pki_dir / "node.crt")
        cfg.tls_key = str(pki_dir / "node.key")
        cfg.token_file = str(pki_dir / "token")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def copy_testfile(name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(pydicom_sample(name), dest / name))
