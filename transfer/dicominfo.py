"""Header-only DICOM inspection (pydicom), shared by the node and the uploader."""

from __future__ import annotations

import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from transfer.errors import ValidationError

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DEFLATED = "1.2.840.10008.1.2.1.99"
_UNDEFINED = 0xFFFFFFFF
# warnings.catch_warnings swaps process-global state: serialise it.
_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class DicomInfo:
    study_uid: str
    series_uid: str
    sop_uid: str
    transfer_syntax: str
    modality: str = ""


def valid_uid(uid: str) -> bool:
    return 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


def _uid(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        raise ValidationError(f"not a usable DICOM object: {keyword} is missing")
    text = str(value).strip().rstrip("\x00").strip()
    if not valid_uid(text):
        raise ValidationError(
            f"not a usable DICOM object: {keyword} {text[:70]!r} is not a valid UID"
        )
    return text


def inspect_fileobj(fp: BinaryIO, size: int) -> DicomInfo:
    """Parse the header (pixel data and other large values deferred) and check the file is whole.

    Raises :class:`ValidationError` with a one-line reason for anything that is not a complete
    DICOM Part 10 object with Study, Series and SOP Instance UIDs.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with _LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fp, defer_size=1024)
            meta = ds.file_meta
            ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            if not ts:
                raise ValidationError(
                    "not a valid DICOM file: Transfer Syntax UID missing from the file meta"
                )
            if ts != _DEFLATED:
                # Every element whose value was skipped must lie inside the file: this catches
                # files truncated in the pixel data, which a header-only read would accept.
                for elem in ds._dict.values():
                    tell = getattr(elem, "value_tell", None)
                    length = getattr(elem, "length", None)
                    if tell is None or length is None or length == _UNDEFINED:
                        continue
                    if tell + length > size:
                        tag = getattr(elem, "tag", "?")
                        raise ValidationError(
                            f"not a valid DICOM file: truncated (element {tag} needs "
                            f"{tell + length} bytes, the file has {size})"
                        )
            modality = str(ds.get("Modality", "") or "")
            return DicomInfo(
                study_uid=_uid(ds, "StudyInstanceUID"),
                series_uid=_uid(ds, "SeriesInstanceUID"),
                sop_uid=_uid(ds, "SOPInstanceUID"),
                transfer_syntax=ts,
                modality=modality,
            )
    except ValidationError:
        raise
    except InvalidDicomError as exc:
        raise ValidationError(f"not a valid DICOM file: {exc}".split(". Use force")[0]) from None
    except Exception as exc:  # pydicom raises many builtin types on malformed input
        raise ValidationError(f"not a valid DICOM file: {type(exc).__name__}: {exc}") from None


def inspect_path(path: str | os.PathLike[str]) -> DicomInfo:
    p = Path(path)
    with p.open("rb") as fp:
        return inspect_fileobj(fp, os.fstat(fp.fileno()).st_size)
