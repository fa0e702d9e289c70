"""Helpers for the transfer tests (imported by name: tests/transfer is on sys.path)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from transfer.config import DaemonConfig
from transfer.protocol import (
    NEED_DATA,
    Ack,
    Connection,
    ConnectionClosed,
    Data,
    EndOfBody,
    FileHeader,
    Hello,
    Request,
    Response,
    Role,
    Welcome,
)


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


class MinimalNode:
    """A node reduced to the protocol's own state machine (``asyncio.start_server(node.handle,
    ...)``), for the uploader's timing and failure paths: it answers HELLO after ``delay``
    seconds (``later`` from its second connection on, if given), drops the connection instead
    of answering the first ``drop_checks`` resume checks, answers the others "missing", and
    ACKs each file after ``ack_delay`` with the digest of what it received; with ``read_rate``
    it reads no faster than that many bytes a second (a slow link). ``seen``, shared by
    every node of a test, counts connections accepted, checks asked and connections accepted
    but not yet welcomed (the most at once in ``most_opening``) and the connections accepted
    when the first file began (``accepted_at_first_file``); ``stored`` gets each file's SOP
    Instance UID."""

    def __init__(
        self,
        seen: dict[str, int],
        stored: list[str],
        *,
        delay: float = 0.0,
        later: float | None = None,
        ack_delay: float = 0.0,
        drop_checks: int = 0,
        read_rate: float = 0.0,
    ) -> None:
        for key in ("accepted", "checks", "opening", "most_opening"):
            seen.setdefault(key, 0)
        self.seen, self.stored = seen, stored
        self.delay, self.later = delay, delay if later is None else later
        self.ack_delay, self.drop_checks = ack_delay, drop_checks
        self.read_rate = read_rate
        self.accepted = 0  # this node's own connections

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = self.seen
        seen["accepted"] += 1
        self.accepted += 1
        delay = self.delay if self.accepted == 1 else self.later
        seen["opening"] += 1
        seen["most_opening"] = max(seen["most_opening"], seen["opening"])
        welcomed = False
        conn = Connection(Role.SERVER)
        digest, file_id = hashlib.sha256(), -1
        try:
            while True:
                data = await reader.read(1 << 16)
                if self.read_rate and data:
                    await asyncio.sleep(len(data) / self.read_rate)
                conn.receive_data(data)
                while (ev := conn.next_event()) is not NEED_DATA:
                    if isinstance(ev, Hello):
                        await asyncio.sleep(delay)
                        seen["opening"] -= 1
                        welcomed = True
                        writer.write(conn.send(Welcome(node="minimal")))
                    elif isinstance(ev, Request):
                        seen["checks"] += 1
                        if seen["checks"] <= self.drop_checks:
                            return  # dropped before the answer
                        want = ev.args["items"]
                        writer.write(conn.send(Response(ev.req_id, True, [False] * len(want))))
                    elif isinstance(ev, FileHeader):
                        seen.setdefault("accepted_at_first_file", seen["accepted"])
                        digest, file_id = hashlib.sha256(), ev.file_id
                        self.stored.append(ev.sop_uid)
                    elif isinstance(ev, Data):
                        digest.update(ev.data)
                    elif isinstance(ev, EndOfBody):
                        await asyncio.sleep(self.ack_delay)
                        writer.write(conn.send(Ack(file_id, "stored", digest.hexdigest())))
                    elif isinstance(ev, ConnectionClosed):
                        return
                await writer.drain()
        finally:
            if not welcomed:
                seen["opening"] -= 1
            writer.close()
