"""Generate a synthetic but valid CT series (DICOM CT Image IOD) for tests, demos and benchmarks.

The paper's workload is a series of 360 CT slices of 640x640 pixels, 16 bits each.  This module
writes such a series with pydicom: one Study, one Series, one Frame of Reference, a unique SOP
Instance UID per slice, and the CT Image IOD's mandatory attributes (patient, study, series,
frame of reference, equipment, image plane, image pixel, CT image modules and SOP common).

The pixel content is a simple anatomical phantom, so that compressors behave as on real CT
(zstd level 1 gives about 2x on the raw series, neither 100x as on zeros nor 1x as on random
bytes): inside a circular reconstruction field of view an elliptical body (soft tissue, a fat
layer, lungs in the upper part of the series, a spine and ribs of bone), air around it, and
Gaussian quantum noise everywhere; outside the field of view the pixel padding value.

Two kinds:

``raw``
    Explicit VR Little Endian, uncompressed: about 820 KB per 640x640 slice (295 MB for 360).
``compressed``
    RLE Lossless (a lossless compressed transfer syntax that pydicom encodes natively), about
    220 KB per 640x640 slice (about 80 MB for 360), the payload size that fits every row of the
    paper's Table 4.  To reach that size with RLE (which cannot predict noise the way JPEG-LS
    does), this kind models a scanner that clips most of the air to -1024 HU (values below
    -1012 HU); the anatomy is the same.  The pixel data decode back exactly (lossless).
    Encoding runs at about 20 slices/s, so the full compressed series takes ~20 s to write.

Everything is deterministic for a given seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

Kind = Literal["raw", "compressed"]
KINDS: tuple[str, ...] = ("raw", "compressed")

_INTERCEPT = -1024  # stored value 0 = -1024 HU
_PADDING = 0  # stored value used outside the field of view (-1024 HU after rescale)
_BITS_STORED = 12  # 0..4095 stored, -1024..3071 HU


class SynthError(ValueError):
    """Bad arguments for the generator."""


@dataclass(frozen=True)
class _Params:
    noise_sd: float  # HU, quantum noise inside the field of view
    air_hu: float  # mean HU of air inside the field of view
    clip_below: float | None  # HU below which a value is clipped to -1024 HU (None: no clipping)


_PARAMS: dict[str, _Params] = {
    "raw": _Params(noise_sd=12.0, air_hu=-1000.0, clip_below=None),
    # Clipped air, lower noise: RLE Lossless lands near 220 KB per 640x640 slice.
    "compressed": _Params(noise_sd=8.0, air_hu=-1024.0, clip_below=-1012.0),
}


def _uid(seed: int, *parts: object) -> str:
    """A deterministic UID under pydicom's root, derived from the seed and ``parts``."""
    return str(generate_uid(entropy_srcs=[f"medstream-synth:{seed}", *map(str, parts)]))


def _phantom(rows: int, cols: int, z: float) -> npt.NDArray[np.float32]:
    """Noise-free HU map of one slice; ``z`` runs from 0 (top of the series) to 1 (bottom)."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    # Normalised coordinates, -1..1 across the matrix.
    u = (x - (cols - 1) / 2.0) / (cols / 2.0)
    v = (y - (rows - 1) / 2.0) / (rows / 2.0)
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)
    # Body outline: an ellipse that widens a little towards the abdomen.
    a = 0.80 + 0.06 * z
    b = 0.58 + 0.04 * z
    body = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    hu[body] = -100.0  # subcutaneous fat
    inner = (u / (a - 0.06)) ** 2 + (v / (b - 0.06)) ** 2 <= 1.0
    hu[inner] = 40.0  # soft tissue
    # Lungs in the upper half of the series, shrinking towards the diaphragm.
    if z < 0.55:
        lr = 0.20 * (1.0 - z / 0.55) ** 0.5 + 0.02
        for side in (-1.0, 1.0):
            lung = ((u - side * 0.38) / (lr * 1.2)) ** 2 + ((v + 0.02) / (lr * 1.8)) ** 2 <= 1.0
            hu[lung & inner] = -850.0
    # Liver-like organ lower down.
    if z > 0.45:
        liver = ((u + 0.25) / 0.35) ** 2 + ((v + 0.05) / 0.30) ** 2 <= 1.0
        hu[liver & inner] = 60.0
    # Aorta with contrast.
    hu[((u + 0.06) / 0.045) ** 2 + ((v - 0.22) / 0.045) ** 2 <= 1.0] = 180.0
    # Spine: a vertebral body (cancellous) with a cortical rim, behind the aorta.
    vb = (u / 0.11) ** 2 + ((v - 0.38) / 0.09) ** 2
    hu[vb <= 1.0] = 700.0
    hu[vb <= 0.6] = 250.0
    # Ribs: small bone ellipses along the inner body wall (upper series only).
    if z < 0.7:
        for k in range(12):
            t = np.pi * (0.08 + 0.84 * k / 11.0)
            cu = (a - 0.09) * np.cos(t) * (1.0 if k % 2 else -1.0)
            cv = -(b - 0.08) * np.sin(t) * 0.9
            hu[((u - cu) / 0.035) ** 2 + ((v - cv) / 0.025) ** 2 <= 1.0] = 900.0
    return hu


def _fov(rows: int, cols: int) -> npt.NDArray[np.bool_]:
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    u = (x - (cols - 1) / 2.0) / (cols / 2.0)
    v = (y - (rows - 1) / 2.0) / (rows / 2.0)
    return np.asarray(u**2 + v**2 <= 1.0)


def _slice_pixels(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    z: float,
    params: _Params,
    fov: npt.NDArray[np.bool_],
) -> npt.NDArray[np.uint16]:
    hu = _phantom(rows, cols, z)
    hu[hu <= -999.0] = params.air_hu
    hu += rng.normal(0.0, params.noise_sd, size=(rows, cols)).astype(np.float32)
    if params.clip_below is not None:
        hu[hu < params.clip_below] = float(_INTERCEPT)
    stored = np.rint(hu - _INTERCEPT)
    stored[~fov] = _PADDING
    return np.clip(stored, 0, (1 << _BITS_STORED) - 1).astype(np.uint16)


def _base_dataset(seed: int, rows: int, cols: int, slices: int, kind: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = "20120913"
    ds.SeriesDate = ds.StudyDate
    ds.AcquisitionDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = "101500"
    ds.SeriesTime = "101600"
    ds.AcquisitionTime = "101610"
    ds.ContentTime = "101620"
    ds.AccessionNumber = f"SYN{seed:07d}"
    ds.Modality = "CT"
    ds.Manufacturer = "medstream synthetic phantom"
    ds.InstitutionName = "medstream"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic CT chest-abdomen"
    ds.SeriesDescription = f"Phantom {slices}x{rows}x{cols} {kind}"
    ds.ManufacturerModelName = "transfer.synth"
    ds.PatientName = f"Phantom^Seed{seed}"
    ds.PatientID = f"SYNTH-{seed}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = "500"
    ds.XRayTubeCurrent = 250
    ds.ExposureTime = 1000
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = _uid(seed, "study")
    ds.SeriesInstanceUID = _uid(seed, "series", kind, rows, cols, slices)
    ds.StudyID = "1"
    ds.SeriesNumber = 2 if kind == "compressed" else 1
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = _uid(seed, "frame", slices)
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    spacing = 500.0 / max(rows, cols)
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelPaddingValue = _PADDING
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.BurnedInAnnotation = "NO"
    ds.InstanceCreationDate = ds.StudyDate
    ds.InstanceCreationTime = ds.StudyTime
    return ds


def generate_series(
    out_dir: str | Path,
    *,
    slices: int = 360,
    rows: int = 640,
    cols: int = 640,
    kind: Kind | str = "raw",
    seed: int = 0,
) -> list[Path]:
    """Write a CT series of ``slices`` files into ``out_dir`` and return their paths in order.

    Files are named ``CT{n:04d}.dcm`` (n from 1).  The directory is created if needed; existing
    files with the same names are overwritten, other files are left alone.
    """
    if kind not in _PARAMS:
        raise SynthError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not 1 <= slices <= 100_000:
        raise SynthError(f"slices must be between 1 and 100000, not {slices}")
    for name, value in (("rows", rows), ("cols", cols)):
        if not 16 <= value <= 4096:
            raise SynthError(f"{name} must be between 16 and 4096, not {value}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = _PARAMS[kind]
    rng = np.random.default_rng(np.random.SeedSequence([seed, rows, cols, slices]))
    fov = _fov(rows, cols)
    base = _base_dataset(seed, rows, cols, slices, kind)
    ts = RLELossless if kind == "compressed" else ExplicitVRLittleEndian
    paths: list[Path] = []
    for i in range(slices):
        z = i / max(slices - 1, 1)
        pixels = _slice_pixels(rng, rows, cols, z, params, fov)
        ds = base.copy()
        sop = _uid(seed, "sop", kind, rows, cols, slices, i)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "MEDSTREAM_SYN"
        ds.file_meta = meta
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = ["-250", "-250", f"{-float(i):.1f}"]
        ds.SliceLocation = f"{-float(i):.1f}"
        ds.set_pixel_data(pixels, "MONOCHROME2", _BITS_STORED, generate_instance_uid=False)
        if ts == RLELossless:
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        path = out / f"CT{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transfer.synth",
        description=(
            "Write a synthetic CT series (valid DICOM CT Image IOD, one study, one series, "
            "16-bit pixels of an anatomical phantom) into OUT. kind 'raw' is uncompressed "
            "(~820 KB per 640x640 slice); 'compressed' is RLE Lossless (~220 KB per slice)."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="output directory (created if missing)")
    parser.add_argument("--slices", type=int, default=360, help="number of slices (default 360)")
    parser.add_argument("--rows", type=int, default=640, help="rows per slice (default 640)")
    parser.add_argument("--cols", type=int, default=640, help="columns per slice (default 640)")
    parser.add_argument("--kind", choices=KINDS, default="raw", help="raw or compressed")
    parser.add_argument("--seed", type=int, default=0, help="seed: same seed, same bytes")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        paths = generate_series(
            args.out,
            slices=args.slices,
            rows=args.rows,
            cols=args.cols,
            kind=args.kind,
            seed=args.seed,
        )
    except SynthError as exc:
        print(f"synth: error: {exc}", file=sys.stderr)
        return 2
    total = sum(p.stat().st_size for p in paths)
    took = time.monotonic() - started
    print(
        f"wrote {len(paths)} {args.kind} slices, {total / 1e6:.1f} MB "
        f"({total / len(paths) / 1e3:.0f} KB/slice) to {args.out} in {took:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
