"""Table 4 of Zhao & Diao (2013), reproduced on a shaped lab network: streaming vs FTP.

    sudo .venv/bin/python bench/table4.py                       # everything, 5 repeats (hours)
    sudo .venv/bin/python bench/table4.py --profiles tanet --regimes shared --repeats 3

A workstation host and 1/5/30 node hosts (plus one server host for FTP and dcmtk) on a
:mod:`labnet` bridge; the workstation's access link is shaped with htb (``lan`` 1 Gbit/s,
``tanet`` 100 Mbit/s, ``adsl`` 2 Mbit/s) in two regimes: ``shared`` (one bottleneck, fair per
destination) and ``perflow`` (every connection capped at --flow-cap, default 1/8 of the link, the
whole bounded by the link). There is no netem on this kernel: links are rate-shaped only, with no
added delay or loss, and every output says so.

Payloads: the generated 360-slice CT series, ``raw`` (640x640x16 bit, ~820 KB a slice, 295 MB)
and ``compressed`` (RLE Lossless, ~220 KB a slice, ~80 MB: the payload that fits every row of
the paper's table). ``--scale`` sends a fraction of the slices on slow links; the time for the
whole series is extrapolated from the measured goodput.

Methods, side by side in one run (each run sends a fresh copy of the series with new UIDs, so
medstream's resume never skips anything):

  medstream       transfer upload (TLS + token, native protocol; the uploader's defaults: 4
                  connections per node, at most 16 in all, at least one per node)
  medstream-zstd  the same with zstd level 1 bodies
  medstream-c1    one connection per node (the paper's one socket per node)
  erl3d           transfer upload --protocol erl3d: the paper's own wire format (plaintext, one
                  file per connection) into transferd's compatibility port
  ftp             vsftpd on one server host <- Python ftplib, one connection (the paper's FTP)
  ftps            the same over explicit FTPS (AUTH TLS, PROT P; the server's certificate
                  verified): the encrypted alternative, to compare with medstream like for like
  ftp-5           the same with 5 parallel connections to the one server
  dcmtk           dcmtk storescu -> storescp on the server host (TCP_NODELAY=1), one association

Writes bench/results/table4.json, table4.md (tables in the paper's shape, ours beside theirs,
goodput as % of the link rate) and table4.png.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    PY,
    REPO,
    BenchError,
    Storescp,
    Transferd,
    Vsftpd,
    code_version,
    machine_info,
    need_tool,
    run_cli,
    run_timed,
    series,
    storescu_argv,
    tail,
    tree_stats,
    write_json,
)
from labnet.shaping import segments_at_mtu  # noqa: E402

PROFILES_MBIT = {"lan": 1000.0, "tanet": 100.0, "adsl": 2.0}
PAPER = {  # Table 4: mean seconds over 30 runs, 360 CT slices
    "lan": {"medstream-1": 9.6, "medstream-5": 5.6, "medstream-30": 6.0, "ftp-1": 10.3},
    "tanet": {"medstream-1": 58.3, "medstream-5": 28.6, "medstream-30": 33.5, "ftp-1": 55.9},
    "adsl": {"medstream-1": 633.8, "medstream-5": 533.1, "medstream-30": 598.0, "ftp-1": 580.1},
}
NO_NETEM = ("no netem on this kernel: links are rate-shaped only (htb), with no added delay or "
            "loss; round trips are those of veth pairs (~0.05 ms)")
METHODS = ("medstream", "medstream-zstd", "medstream-c1", "erl3d", "ftp", "ftps", "ftp-5",
           "dcmtk")
NODE_METHODS = ("medstream", "medstream-zstd", "medstream-c1", "erl3d")
NATIVE_PORT, ERL3D_PORT, FTP_PORT, DICOM_PORT = 7370, 7371, 21, 11112
FTPPUT = Path(__file__).resolve().parent / "ftpput.py"
UID_ROOT = "1.2.826.0.1.3680043.8.498."


@dataclass
class Run:
    profile: str
    regime: str
    payload: str
    method: str
    nodes: int
    repeat: int
    files: int
    bytes: int             # DICOM file bytes delivered
    full_bytes: int        # bytes of the whole series (for extrapolation)
    wall_s: float          # client process spawn -> exit
    tool_s: float          # the tool's own transfer time (its report), else wall
    wire_bytes: int | None = None
    stored_files: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def goodput_mbit(self) -> float:
        return self.bytes * 8 / self.tool_s / 1e6

    @property
    def full_s(self) -> float:
        return self.tool_s * self.full_bytes / self.bytes


Cell = tuple[str, str, str, str, int]


def cell_of(r: Run) -> Cell:
    return (r.profile, r.regime, r.payload, r.method, r.nodes)


def merge_runs(prev: list[Run], new: list[Run], measured: set[Cell]) -> list[Run]:
    """``prev`` without the cells this invocation measured again, then ``new``: a re-run
    (say at another --scale) replaces a cell instead of mixing two sizes into one mean."""
    return [r for r in prev if cell_of(r) not in measured] + new


# --- fresh copies with new UIDs ------------------------------------------------------------------

_UID_CACHE: dict[Path, list[tuple[str, str, str]]] = {}


def _uids(files: Sequence[Path]) -> list[tuple[str, str, str]]:
    import pydicom

    key = files[0].parent
    if key not in _UID_CACHE or len(_UID_CACHE[key]) < len(files):
        out = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            out.append((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                        str(ds.SOPInstanceUID)))
        _UID_CACHE[key] = out
    return _UID_CACHE[key][: len(files)]


def _same_length_uid(uid: str, tag: int, index: int) -> str:
    if not uid.startswith(UID_ROOT):
        raise BenchError(f"unexpected UID root in {uid}")
    width = len(uid) - len(UID_ROOT)
    body = f"9{tag:06d}{index:07d}"
    if len(body) > width:
        raise BenchError(f"UID {uid} too short to relabel")
    return UID_ROOT + body + "1" * (width - len(body))


def relabel(files: Sequence[Path], dst: Path, tag: int) -> list[Path]:
    """Copy files into dst with new Study/Series/SOP Instance UIDs of the same length (so the
    files stay valid byte for byte elsewhere): a new study that no node holds yet."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (f, (study, ser, sop)) in enumerate(zip(files, _uids(files), strict=True)):
        data = f.read_bytes()
        for old, idx in ((sop, i), (ser, 9_999_998), (study, 9_999_999)):
            new = _same_length_uid(old, tag, idx)
            data = data.replace(old.encode(), new.encode())
        p = dst / f.name
        p.write_bytes(data)
        out.append(p)
    return out


# --- the lab ---------------------------------------------------------------------------------------

class Bench:
    def __init__(self, lab: Any, nodes: int, base: Path, tls: bool, connections: int) -> None:
        self.lab = lab
        self.connections = connections
        self.base = base
        self.tls = tls
        self.code = code_version()
        self.packets = "gso"  # what the workstation's shaped link carries: "mtu" or "gso" aggregates
        self.ws = lab.add_host("ws", sshd=False)
        self.srv = lab.add_host("srv", sshd=False)
        names = [f"node-{i:02d}" for i in range(1, nodes + 1)]
        self.nodes = lab.add_hosts(names, sshd=False, timeout=60.0)
        self.daemons: list[Transferd] = []
        self.ftp: Vsftpd | None = None
        self.scp: Storescp | None = None
        self.conf = base / "transfer.toml"
        self.cert: tuple[Path, Path] | None = None
        self.token: Path | None = None
        self._pki()  # the FTPS server needs a certificate even when medstream runs in plaintext
        if not tls:
            self.cert = self.token = None
            self.conf.write_text("[transfer]\n")

    def _pki(self) -> None:
        import subprocess

        exe = need_tool("transfer")
        pki = self.base / "pki"
        subprocess.run([exe, "pki", "init", str(pki)], check=True, capture_output=True,
                       timeout=60)
        ips = [a for h in self.nodes for a in ("--ip", h.ip)]
        cp = subprocess.run([exe, "pki", "issue", str(pki), "--name", "nodes", *ips],
                            capture_output=True, text=True, timeout=60)
        if cp.returncode != 0:
            raise BenchError(f"transfer pki issue: {tail(cp.stderr)}")
        cp = subprocess.run([exe, "pki", "issue", str(pki), "--name", "srv", "--ip", self.srv.ip],
                            capture_output=True, text=True, timeout=60)
        if cp.returncode != 0:
            raise BenchError(f"transfer pki issue: {tail(cp.stderr)}")
        self.ca = pki / "ca.crt"
        self.srv_cert = (pki / "srv.crt", pki / "srv.key")
        self.cert = (pki / "nodes.crt", pki / "nodes.key")
        self.token = pki / "token"
        self.conf.write_text(f'[transfer]\nca_file = "{pki / "ca.crt"}"\n'
                             f'token_file = "{self.token}"\n')

    def start_servers(self) -> None:
        """(Re)start every server with empty storage."""
        self.stop_servers()
        for h in self.nodes:
            work = self.base / h.name
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            d = Transferd(work, bind=h.ip, port=NATIVE_PORT, erl3d_port=ERL3D_PORT,
                          tls=self.cert, token_file=self.token, spawn=h.popen)
            self.daemons.append(d)
            d.start()
        work = self.base / "srv"
        shutil.rmtree(work, ignore_errors=True)
        (work / "ftp").mkdir(parents=True)
        (work / "scp").mkdir(parents=True)
        self.ftp = Vsftpd(work / "ftp", bind=self.srv.ip, port=FTP_PORT, spawn=self.srv.popen,
                          tls=self.srv_cert)
        self.ftp.start()
        self.scp = Storescp(work / "scp", port=DICOM_PORT, host=self.srv.ip, spawn=self.srv.popen)
        self.scp.start()

    def stop_servers(self) -> None:
        for d in self.daemons:
            d.stop()
        self.daemons = []
        for s in (self.ftp, self.scp):
            if s is not None:
                s.stop()
        self.ftp = self.scp = None

    def stored(self, method: str, nodes: int) -> tuple[int, int]:
        if method in NODE_METHODS:
            n = b = 0
            for d in self.daemons[:nodes]:
                f, s = tree_stats(d.storage, ".dcm")
                n, b = n + f, b + s
            return n, b
        if method.startswith("ftp"):
            assert self.ftp is not None
            return tree_stats(self.ftp.incoming)
        assert self.scp is not None
        return tree_stats(self.scp.out)

    def wipe(self) -> None:
        """Delete what the servers stored (the daemons' indexes keep their rows: every run uses
        new UIDs, so nothing collides), keeping tmpfs use bounded."""
        for d in self.daemons:
            for child in d.storage.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
        for s in (self.ftp.incoming if self.ftp else None, self.scp.out if self.scp else None):
            if s is not None and s.exists():
                for child in s.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink()

    def argv(self, method: str, nodes: int, src: Path, files: list[Path], report: Path,
             tag: int, payload: str) -> list[str]:
        if method.startswith("medstream") or method == "erl3d":
            port = ERL3D_PORT if method == "erl3d" else NATIVE_PORT
            argv = [need_tool("transfer"), "upload", str(src), "--config", str(self.conf),
                    "--nodes", ",".join(f"{h.ip}:{port}" for h in self.nodes[:nodes]),
                    "--json-report", str(report), "--no-progress"]
            if method == "erl3d":
                argv += ["--protocol", "erl3d"]
            elif not self.tls:
                argv.append("--insecure-plaintext")
            if method == "medstream-zstd":
                argv.append("--zstd")
            if method == "medstream-c1":
                argv += ["--connections", "1"]
            elif method != "erl3d":
                argv += ["--connections", str(self.connections)]
            return argv
        if method.startswith("ftp"):
            k = 5 if method == "ftp-5" else 1
            tls = ["--tls", str(self.ca)] if method == "ftps" else []
            return [PY, str(FTPPUT), self.srv.ip, str(FTP_PORT), f"incoming/run{tag}",
                    *map(str, files), "--connections", str(k), *tls, "--json"]
        if method == "dcmtk":
            return storescu_argv(self.srv.ip, DICOM_PORT, files, rle=payload == "compressed")
        raise BenchError(f"unknown method {method}")


def variants(methods: Sequence[str], node_counts: Sequence[int], regime: str) -> list[
        tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for m in methods:
        if m in NODE_METHODS:
            if m == "medstream-c1" and regime != "perflow":
                continue  # one connection per node only matters under per-flow caps
            out += [(m, n) for n in node_counts]
        else:
            out.append((m, 1))
    return out


def run_one(b: Bench, profile: str, regime: str, payload: str, method: str, nodes: int,
            repeat: int, files: list[Path], full_bytes: int, tag: int) -> Run:
    work = b.base / f"run{tag}"
    src = work / "series"
    try:
        copy = relabel(files, src, tag)
        nbytes = sum(p.stat().st_size for p in copy)
        report = work / "report.json"
        rate = PROFILES_MBIT[profile] * 1e6 / 8
        timeout = 120 + 4 * nbytes / rate
        before = b.stored(method, nodes)[0]
        res = run_timed(b.argv(method, nodes, src, copy, report, tag, payload), spawn=b.ws.popen,
                        env={"TCP_NODELAY": "1"} if method == "dcmtk" else None, timeout=timeout)
        if res.returncode != 0:
            raise BenchError(f"{method} x{nodes}: exit {res.returncode}: "
                             f"{tail(res.stderr or res.stdout)}")
        tool_s, wire = res.seconds, None
        extra: dict[str, Any] = {"client_rss_mb": round(res.maxrss_kb / 1024, 1),
                                 "code": b.code, "packets": b.packets}
        if report.exists():
            import json

            rep = json.loads(report.read_text())
            tool_s = float(rep["seconds"])
            wire = sum(int(n.get("wire_bytes") or 0) for n in rep.get("nodes", [])) or None
            extra["scan_s"] = rep.get("scan_seconds")
            if rep.get("phases"):  # start-up to the first file, last ACK, closing
                extra["phases"] = rep["phases"]
            # Connections as opened (the uploader caps them across nodes) and the most any node
            # had at once (a finished node hands its connections to the busiest).
            if rep.get("connections_per_node"):
                extra["connections_per_node"] = int(rep["connections_per_node"])
                extra["connections_max"] = max(
                    int(n.get("connections") or 0) for n in rep.get("nodes", []))
        elif method.startswith("ftp"):
            import json

            tool_s = float(json.loads(res.stdout)["seconds"])
        stored = b.stored(method, nodes)[0] - before
        if stored != len(copy):
            raise BenchError(f"{method} x{nodes}: {stored} files stored, expected {len(copy)}")
        return Run(profile=profile, regime=regime, payload=payload, method=method, nodes=nodes,
                   repeat=repeat, files=len(copy), bytes=nbytes, full_bytes=full_bytes,
                   wall_s=res.seconds, tool_s=tool_s, wire_bytes=wire, stored_files=stored,
                   extra=extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        b.wipe()


# --- summaries, tables, chart ----------------------------------------------------------------------

def _ms(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarize_runs(runs: list[Run]) -> list[dict[str, Any]]:
    groups: dict[Cell, list[Run]] = {}
    for r in runs:
        groups.setdefault(cell_of(r), []).append(r)
    out = []
    for (profile, regime, payload, method, nodes), rs in groups.items():
        link = PROFILES_MBIT[profile]
        gp = [r.goodput_mbit for r in rs]
        img = [r.bytes * 8 / r.tool_s / 1e6 for r in rs]
        t, tsd = _ms([r.tool_s for r in rs])
        full, fsd = _ms([r.full_s for r in rs])
        g, gsd = _ms(gp)
        out.append({
            "profile": profile, "regime": regime, "payload": payload, "method": method,
            "nodes": nodes, "repeats": len(rs), "files": rs[0].files, "bytes": rs[0].bytes,
            "scale": rs[0].bytes / rs[0].full_bytes,
            "seconds_mean": t, "seconds_sd": tsd,
            "wall_seconds_mean": statistics.fmean(r.wall_s for r in rs),
            "full_series_seconds_mean": full, "full_series_seconds_sd": fsd,
            "goodput_mbit_mean": g, "goodput_mbit_sd": gsd,
            "goodput_pct_link": 100 * g / link,
            "wall_goodput_pct_link": 100 * statistics.fmean(
                r.bytes * 8 / r.wall_s / 1e6 for r in rs) / link,
            "image_throughput_x_link": statistics.fmean(img) / link,
            "wire_ratio": (statistics.fmean(r.bytes / r.wire_bytes for r in rs if r.wire_bytes)
                           if all(r.wire_bytes for r in rs) else None),
            "client_rss_mb_max": max(r.extra.get("client_rss_mb", 0) for r in rs),
            "connections_per_node": rs[0].extra.get("connections_per_node"),
            "connections_max": max((r.extra.get("connections_max") or 0) for r in rs) or None,
            "code": ",".join(sorted({r.extra.get("code") or "unrecorded" for r in rs})),
            # runs before the lab sent MTU-sized packets on slow links recorded nothing: "gso"
            "packets": ",".join(sorted({r.extra.get("packets") or "gso" for r in rs})),
        })
    return out


def _find(summary: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    for s in summary:
        if all(s.get(k) == v for k, v in kw.items()):
            return s
    return None


def check_targets(summary: list[dict[str, Any]], flow_cap_frac: float,
                  conns: int) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on what was run."""
    out: list[dict[str, Any]] = []

    def add(name: str, ok: bool, detail: str, tie: bool = False) -> None:
        # tie: missed on the means, but by less than one standard deviation (noise at 3-5
        # repeats); reported as such, never counted as met
        out.append({"target": name, "met": ok, "tie": tie and not ok, "detail": detail})

    keys = {(s["profile"], s["regime"], s["payload"]) for s in summary}
    for profile, regime, payload in sorted(keys):
        sel = [s for s in summary if (s["profile"], s["regime"], s["payload"]) ==
               (profile, regime, payload)]
        where = f"{profile}/{regime}/{payload}"
        ms = {s["nodes"]: s for s in sel if s["method"] == "medstream"}
        ftp = next((s for s in sel if s["method"] == "ftp"), None)
        link = PROFILES_MBIT[profile]
        if regime == "shared":
            for n, s in sorted(ms.items()):
                add(f"{where}: medstream x{n} goodput >= 93% of link",
                    s["goodput_pct_link"] >= 93.0, f"{s['goodput_pct_link']:.1f}%")
            if 5 in ms and 30 in ms:
                a, b = ms[30], ms[5]
                tol = max(a["seconds_sd"], b["seconds_sd"])
                add(f"{where}: 30 nodes no slower than 5",
                    a["seconds_mean"] <= b["seconds_mean"] + tol,
                    f"{a['seconds_mean']:.2f} s vs {b['seconds_mean']:.2f} s (sd {tol:.2f})")
            if ftp and ms:
                top = max(ms.values(), key=lambda s: s["goodput_mbit_mean"])
                best, f = top["goodput_mbit_mean"], ftp["goodput_mbit_mean"]
                tol = max(top.get("goodput_mbit_sd", 0.0), ftp.get("goodput_mbit_sd", 0.0))
                add(f"{where}: medstream >= FTP in the same run", best >= f,
                    f"medstream x{top['nodes']} {best:.4g} ± {top.get('goodput_mbit_sd', 0):.2g} "
                    f"vs FTP {f:.4g} ± {ftp.get('goodput_mbit_sd', 0):.2g} Mbit/s",
                    tie=f - best <= tol)
        else:
            cap = link * flow_cap_frac
            for method, asked in (("medstream-c1", 1), ("medstream", conns)):
                for s in sorted((s for s in sel if s["method"] == method),
                                key=lambda s: s["nodes"]):
                    # the connections the uploader opened (runs before it capped them across
                    # nodes did not record it: they opened what was asked)
                    flows = s["nodes"] * (s.get("connections_per_node") or asked)
                    want = 0.9 * min(flows * cap, 0.95 * link)
                    add(f"{where}: {method} x{s['nodes']} ({flows} flows) >= 0.9 x "
                        f"min(flows x cap, link)", s["goodput_mbit_mean"] >= want,
                        f"{s['goodput_mbit_mean']:.4g} vs {want:.4g} Mbit/s")
        if profile in ("tanet", "adsl") and payload == "raw":
            for s in sel:
                if s["method"] == "medstream-zstd":
                    add(f"{where}: zstd x{s['nodes']} image throughput >= 1.8 x link",
                        s["image_throughput_x_link"] >= 1.8,
                        f"{s['image_throughput_x_link']:.2f} x link")
    return out


def render_md(data: dict[str, Any], name: str = "table4") -> str:
    summary = data["summary"]
    cfg = data["config"]
    lines = [
        "# Table 4 reproduced: streaming to 1/5/30 nodes vs FTP on shaped links",
        "",
        f"**{NO_NETEM}.**",
        "",
        f"Command: `{data['command']}`  ",
        f"Started {data['started']}, {data['elapsed_s'] / 60:.1f} min of runs; repeats per cell: "
        f"{cfg['repeats']} (the paper used 30); figures are mean ± sd. Security: "
        f"{'TLS + token' if cfg['tls'] else 'plaintext (--plaintext)'} for medstream, TLS for "
        "FTPS; erl3d, FTP and DICOM are plaintext. Per-flow cap (perflow regime): "
        f"{cfg['flow_cap_frac']:.3g} x link." + (
            f" TCP congestion control: {data['machine']['tcp_congestion_control']} (the "
            "machine's default, inherited by every lab host)."
            if data.get("machine", {}).get("tcp_congestion_control") else ""),
        "",
        "Time for the whole 360-slice series is extrapolated from the measured goodput where "
        "--scale sent a fraction of it (column `scale`). Goodput = DICOM file bytes delivered "
        "(acknowledged) per second of the tool's own transfer time; % of link is against the "
        "nominal rate (TCP/IP headers cap goodput near 95-96%). The tool's own time is "
        "medstream's report `seconds` (from the start of its directory walk to its last "
        "connection closed; the DICOM scan and hashing run within it, overlapped with sending, "
        "and their own duration is `scan_s` of the runs), ftplib's first connect to its QUIT "
        "(it is handed the file list), and the process lifetime for dcmtk; `% of link, wall` "
        "uses the whole client process lifetime instead (Python start-up and all).",
        "",
    ]
    codes: dict[str, list[str]] = {}
    for c in summary:
        codes.setdefault(c.get("code") or "unrecorded", []).append(
            f"{c['profile']}/{c['regime']}/{c['payload']} {c['method']} x{c['nodes']}")
    if len(codes) == 1:
        lines += [f"Code measured (transfer/ as of commit): {next(iter(codes))}.", ""]
    else:
        most = max(codes, key=lambda k: len(codes[k]))
        lines += ["Code measured (transfer/ as of commit), by cell:", ""]
        lines += [f"- {code} ({len(cells)} cells): " + ", ".join(cells)
                  for code, cells in codes.items() if code != most]
        lines += [f"- {most}: the other {len(codes[most])} cells", ""]
    gso = [f"{c['profile']}/{c['regime']}/{c['payload']} {c['method']} x{c['nodes']}"
           for c in summary if "gso" in c.get("packets", "gso")
           and segments_at_mtu(int(PROFILES_MBIT[c["profile"]] * 1e6))]
    if gso:
        lines += ["Measured while the workstation still sent GSO aggregates of up to 64 KiB "
                  "through the slow link's shaper (before the lab sent MTU-sized packets on "
                  f"links below ~500 Mbit/s, or with --keep-gso): {', '.join(gso)}.", ""]
    for regime in cfg["regimes"]:
        for payload in cfg["payloads"]:
            rows = [p for p in cfg["profiles"] if _find(summary, profile=p, regime=regime,
                                                        payload=payload)]
            if not rows:
                continue
            pl = ("raw 640x640x16, ~295 MB" if payload == "raw"
                  else "RLE lossless, ~80 MB (fits the paper's figures)")
            lines += [f"## {regime} bottleneck, payload {payload} ({pl})", "",
                      "Seconds for 360 slices, ours (paper's in brackets):", "",
                      "| network | streaming 1 node | 5 nodes | 30 nodes | FTP 1 server |",
                      "|---|---|---|---|---|"]
            for p in rows:
                cells = []
                for key in ("medstream-1", "medstream-5", "medstream-30", "ftp-1"):
                    m, n = key.rsplit("-", 1)
                    s = _find(summary, profile=p, regime=regime, payload=payload, method=m,
                              nodes=int(n))
                    ours = (f"{s['full_series_seconds_mean']:.1f} ± "
                            f"{s['full_series_seconds_sd']:.1f}" if s else "-")
                    cells.append(f"{ours} ({PAPER[p][key]})")
                lines.append(f"| {p} {PROFILES_MBIT[p]:g} Mbit/s | " + " | ".join(cells) + " |")
            lines += ["", "All methods:", "",
                      "| network | method | nodes | scale | s (measured) | s for 360 slices | "
                      "goodput Mbit/s | % of link | % of link, wall | image x link | "
                      "connections per node (most on one) | client RSS MB |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for p in rows:
                for s in sorted((s for s in summary if s["profile"] == p and
                                 s["regime"] == regime and s["payload"] == payload),
                                key=lambda s: (METHODS.index(s["method"]), s["nodes"])):
                    lines.append(
                        f"| {p} | {s['method']} | {s['nodes']} | {s['scale']:.3g} | "
                        f"{s['seconds_mean']:.2f} ± {s['seconds_sd']:.2f} | "
                        f"{s['full_series_seconds_mean']:.1f} | "
                        f"{s['goodput_mbit_mean']:.2f} ± {s['goodput_mbit_sd']:.2f} | "
                        f"{s['goodput_pct_link']:.1f}% | {s['wall_goodput_pct_link']:.1f}% | "
                        f"{s['image_throughput_x_link']:.2f} | "
                        f"{_conns(s)} | {s['client_rss_mb_max']:.0f} |")
            lines.append("")
    both = like_for_like(summary) if cfg["tls"] else []
    if both:
        lines += ["## Like for like: both encrypted", "",
                  "medstream (TLS 1.3 + token) beside FTPS (TLS 1.3, AUTH TLS + PROT P) in the same "
                  "run: the comparison a user who must encrypt medical images faces (the FTP "
                  "target above compares encrypted medstream with plaintext FTP).", ""]
        lines += both + [""]
    if data["targets"]:
        lines += ["## Targets", ""]
        lines += [f"- {'met' if t['met'] else 'tie, within 1 sd' if t.get('tie') else '**MISSED**'}"
                  f": {t['target']} ({t['detail']})"
                  for t in data["targets"]]
        lines.append("")
    if data["errors"]:
        lines += ["## Errors", ""] + [f"- {e}" for e in data["errors"]] + [""]
    lines.append(f"Chart: `{name}.png` beside this file.")
    return "\n".join(lines) + "\n"


def like_for_like(summary: list[dict[str, Any]]) -> list[str]:
    """One line per cell with FTPS: medstream's best node count beside it."""
    out = []
    for f in summary:
        if f["method"] != "ftps":
            continue
        cell = (f["profile"], f["regime"], f["payload"])
        ms = [s for s in summary if s["method"] == "medstream"
              and (s["profile"], s["regime"], s["payload"]) == cell]
        if not ms:
            continue
        top = max(ms, key=lambda s: s["goodput_mbit_mean"])
        g, fg = top["goodput_mbit_mean"], f["goodput_mbit_mean"]
        out.append(f"- {'/'.join(cell)}: medstream x{top['nodes']} {g:.4g} ± "
                   f"{top['goodput_mbit_sd']:.2g} Mbit/s vs FTPS {fg:.4g} ± "
                   f"{f['goodput_mbit_sd']:.2g} Mbit/s ({g / fg:.2f}x); 360 slices in "
                   f"{top['full_series_seconds_mean']:.1f} vs {f['full_series_seconds_mean']:.1f} s")
    order = list(PROFILES_MBIT)
    return sorted(out, key=lambda line: order.index(line[2:].split("/")[0]))


def _conns(s: dict[str, Any]) -> str:
    per, most = s.get("connections_per_node"), s.get("connections_max")
    if not per:
        return "-"
    return f"{per} ({most})" if most and most != per else str(per)


def chart(data: dict[str, Any], path: Path) -> None:
    """One column per profile; a row of image throughput (% of link) per regime, with the
    compressed and raw payloads side by side for every method, and a last row with the time
    for the series beside the paper's."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = data["summary"]
    cfg = data["config"]
    profiles = [p for p in cfg["profiles"] if _find(summary, profile=p)]
    if not profiles:
        return
    regimes = [r for r in cfg["regimes"] if _find(summary, regime=r)]
    payloads = [pl for pl in ("compressed", "raw") if pl in cfg["payloads"]]
    nrows = len(regimes) + 1
    fig, axes = plt.subplots(nrows, len(profiles), figsize=(5.6 * len(profiles), 4.1 * nrows),
                             squeeze=False)
    colors = {"compressed": "#1f77b4", "raw": "#9ecae1"}
    for col, p in enumerate(profiles):
        for row, r in enumerate(regimes):
            ax = axes[row][col]
            labels: list[str] = []
            for s in summary:
                lab = (f"{s['method']} x{s['nodes']}" if s["method"] in NODE_METHODS
                       else s["method"])
                if s["profile"] == p and s["regime"] == r and lab not in labels:
                    labels.append(lab)
            labels.sort(key=lambda lab: (METHODS.index(lab.split(" x")[0]),
                                         int(lab.split(" x")[1]) if " x" in lab else 0))
            if not labels:
                ax.set_axis_off()
                ax.set_title(f"{p}, {r}: not run", fontsize=9)
                continue
            width = 0.8 / max(1, len(payloads))
            for k, pl in enumerate(payloads):
                vals = []
                for lab in labels:
                    m, _, n = lab.partition(" x")
                    s = _find(summary, profile=p, regime=r, payload=pl, method=m,
                              nodes=int(n) if n else 1)
                    vals.append(100 * s["image_throughput_x_link"] if s else math.nan)
                xs = [i + (k - (len(payloads) - 1) / 2) * width for i in range(len(labels))]
                ax.bar(xs, vals, width, label=pl, color=colors[pl], edgecolor="#333333",
                       linewidth=0.4)
            ax.axhline(100, color="k", lw=0.8, ls="--")
            ax.text(len(labels) - 0.5, 101, "link rate", ha="right", va="bottom", fontsize=7)
            if r == "perflow":
                cap = 100 * cfg["flow_cap_frac"]
                ax.axhline(cap, color="#d62728", lw=0.8, ls=":")
                ax.text(len(labels) - 0.5, cap + 1, "one flow's cap", ha="right", va="bottom",
                        fontsize=7, color="#d62728")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=55, ha="right", fontsize=8)
            ax.set_title(f"{p} ({PROFILES_MBIT[p]:g} Mbit/s), {r}: image throughput", fontsize=10)
            ax.set_ylabel("% of link rate (DICOM bytes/s)", fontsize=8)
            ax.legend(fontsize=7, loc="upper left")
        ax2 = axes[nrows - 1][col]
        keys = ["medstream-1", "medstream-5", "medstream-30", "ftp-1"]
        ours = []
        for key in keys:
            m, n = key.rsplit("-", 1)
            s = _find(summary, profile=p, regime="shared", payload="compressed", method=m,
                      nodes=int(n))
            ours.append(s["full_series_seconds_mean"] if s else math.nan)
        xs2 = range(len(keys))
        ax2.bar([x - 0.2 for x in xs2], [PAPER[p][k] for k in keys], 0.4, label="paper (2013)",
                color="#999999")
        ax2.bar([x + 0.2 for x in xs2], ours, 0.4, label="ours (~80 MB payload, shared)",
                color="#2ca02c")
        for x, v in zip(xs2, ours, strict=True):
            if not math.isnan(v):
                ax2.text(x + 0.2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        ax2.set_xticks(list(xs2))
        ax2.set_xticklabels(["stream 1", "stream 5", "stream 30", "FTP"])
        top = max([PAPER[p][k] for k in keys] + [v for v in ours if not math.isnan(v)])
        ax2.set_ylim(0, top * 1.3)  # room for the legend above the bars
        ax2.set_ylabel("seconds for 360 slices", fontsize=8)
        ax2.set_title(f"{p}: time for the series, ours vs the paper", fontsize=10)
        ax2.legend(fontsize=7, loc="upper center", ncol=2)
    title = ("medstream vs FTP vs the paper's Table 4 (bars above 100% = zstd delivering more "
             "image bytes than the link carries). " + NO_NETEM + ".")
    fig.suptitle(textwrap.fill(title, 40 * len(profiles) + 20), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------

def _union(a: Sequence[str], b: Sequence[str], order: Sequence[str]) -> list[str]:
    return [x for x in order if x in a or x in b]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_scale(text: str, profiles: Sequence[str]) -> dict[str, float]:
    """'0.1' for every profile, or 'lan=1,tanet=0.25,adsl=0.02'."""
    out = dict.fromkeys(profiles, 1.0)
    for part in _csv(text):
        if "=" in part:
            key, val = part.split("=", 1)
            out[key.strip()] = float(val)
        else:
            out = dict.fromkeys(profiles, float(part))
    for name, frac in out.items():
        if not 0 < frac <= 1:
            raise SystemExit(f"table4: --scale for {name} must be in (0, 1], not {frac}")
    return out


def runs_from_json(data: dict[str, Any]) -> list[Run]:
    """The runs stored in a table4 JSON file (fields this version does not know are dropped)."""
    fields = set(Run.__dataclass_fields__)
    return [Run(**{k: v for k, v in r.items() if k in fields}) for r in data["runs"]]


def rerender(out: Path, name: str) -> int:
    """Recompute summary and targets from the stored runs; rewrite json, md and png."""
    import json

    path = out / f"{name}.json"
    if not path.exists():
        print(f"table4: {path} does not exist", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    runs = runs_from_json(data)
    cfg = data["config"]
    data["summary"] = summarize_runs(runs)
    data["targets"] = check_targets(data["summary"], cfg["flow_cap_frac"],
                                    cfg["connections_per_node"])
    write_json(path, data)
    (out / f"{name}.md").write_text(render_md(data, name))
    chart(data, out / f"{name}.png")
    print((out / f"{name}.md").read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Reproduce the paper's Table 4 on a shaped lab network (needs root). "
                    + NO_NETEM + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 3)[3])
    p.add_argument("--profiles", default="lan,tanet,adsl")
    p.add_argument("--regimes", default="shared,perflow")
    p.add_argument("--payloads", default="compressed,raw")
    p.add_argument("--nodes", default="1,5,30", help="node counts (default 1,5,30)")
    p.add_argument("--methods",
                   default="medstream,medstream-zstd,medstream-c1,erl3d,ftp,ftps,dcmtk",
                   help=f"subset of {','.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scale", default="lan=1,tanet=1,adsl=0.1",
                   help="fraction of the series to send, one value or per profile "
                        "(e.g. lan=1,tanet=0.25,adsl=0.05); times are extrapolated")
    p.add_argument("--slices", type=int, default=360)
    p.add_argument("--rows", type=int, default=640)
    p.add_argument("--cols", type=int, default=640)
    p.add_argument("--flow-cap", type=float, default=1 / 8,
                   help="per-flow cap as a fraction of the link in the perflow regime")
    p.add_argument("--plaintext", action="store_true",
                   help="run medstream without TLS/token (labelled in the output)")
    p.add_argument("--connections", type=int, default=4,
                   help="connections per node for 'medstream' (the uploader's default is 4)")
    p.add_argument("--tmp", type=Path, default=Path("/dev/shm"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default="table4", help="output file stem (default table4)")
    p.add_argument("--keep-going", action="store_true", help="record failures and go on")
    p.add_argument("--keep-gso", action="store_true",
                   help="let the workstation send GSO aggregates through slow shaped links, as "
                        "the lab did before it sent MTU-sized packets there (for comparisons)")
    p.add_argument("--append", action="store_true",
                   help="merge with the runs already in OUT/NAME.json (several invocations with "
                        "different matrices build one table; a cell measured again replaces "
                        "its earlier runs)")
    p.add_argument("--rerender", action="store_true",
                   help="measure nothing: re-evaluate the targets and rewrite NAME.md and "
                        "NAME.png from the runs in OUT/NAME.json (no root needed)")
    a = p.parse_args(argv)
    if a.rerender:
        return rerender(a.out, a.name)
    profiles, regimes, payloads = _csv(a.profiles), _csv(a.regimes), _csv(a.payloads)
    methods = _csv(a.methods)
    node_counts = [int(n) for n in _csv(a.nodes)]
    for name, vals, allowed in (("profile", profiles, PROFILES_MBIT), ("regime", regimes,
                                ("shared", "perflow")), ("payload", payloads, ("raw", "compressed")),
                                ("method", methods, METHODS)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {', '.join(allowed)}")
    scale = parse_scale(a.scale, profiles)
    if os.geteuid() != 0:
        print("table4: needs root (network namespaces, htb)", file=sys.stderr)
        return 2
    from labnet import Lab

    # SIGTERM unwinds like Ctrl-C, so that the lab (namespaces, links, daemons) and the work
    # directory are torn down rather than left behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"table4: {NO_NETEM}", flush=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.monotonic()
    cache = a.tmp / "medstream-bench-cache"
    base = a.tmp / f"medstream-table4-{os.getpid()}"
    runs: list[Run] = []
    errors: list[str] = []
    shapes: list[str] = []
    measured: set[Cell] = set()
    tag = 0
    try:
        full = {pl: series(cache, slices=a.slices, kind=pl, rows=a.rows, cols=a.cols)
                for pl in payloads}
        base.mkdir(parents=True)
        with Lab.create() as lab:
            bench = Bench(lab, max(node_counts), base, tls=not a.plaintext,
                          connections=a.connections)
            bench.start_servers()
            for profile in profiles:
                for regime in regimes:
                    shape = lab.shape(bench.ws, profile=profile, regime=regime,
                                      flow_cap=int(PROFILES_MBIT[profile] * 1e6 * a.flow_cap),
                                      mtu_segments=False if a.keep_gso else None)
                    bench.packets = "mtu" if shape.mtu_segments else "gso"
                    shapes.append(shape.describe())
                    print(f"== {shape.describe()}", flush=True)
                    for payload in payloads:
                        files = full[payload]
                        k = max(1, round(len(files) * scale[profile]))
                        sub = files[:k]
                        full_bytes = sum(f.stat().st_size for f in files)
                        vs = variants(methods, node_counts, regime)
                        measured.update((profile, regime, payload, m, n) for m, n in vs)
                        for r in range(a.repeats):
                            order = vs[r % len(vs):] + vs[: r % len(vs)]
                            for method, n in order:
                                tag += 1
                                try:
                                    run = run_one(bench, profile, regime, payload, method, n, r,
                                                  sub, full_bytes, tag)
                                except BenchError as exc:
                                    if not a.keep_going:
                                        raise
                                    errors.append(f"{profile}/{regime}/{payload}: {exc}")
                                    print(f"   FAILED {exc}", flush=True)
                                    continue
                                runs.append(run)
                                print(f"   {profile:<5} {regime:<7} {payload:<10} "
                                      f"{method:<14} x{n:<2} r{r + 1}: {run.files} files "
                                      f"{run.bytes / 1e6:7.1f} MB {run.tool_s:7.2f} s "
                                      f"{run.goodput_mbit:8.2f} Mbit/s "
                                      f"({100 * run.goodput_mbit / PROFILES_MBIT[profile]:5.1f}%)",
                                      flush=True)
                    lab.unshape(bench.ws)
            bench.stop_servers()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    commands = [" ".join(["bench/table4.py", *(argv if argv is not None else sys.argv[1:])])]
    prev_path = a.out / f"{a.name}.json"
    if a.append and prev_path.exists():
        import json

        prev = json.loads(prev_path.read_text())
        runs = merge_runs(runs_from_json(prev), runs, measured)
        errors = prev.get("errors", []) + errors
        shapes = prev.get("shapes", []) + shapes
        commands = prev.get("commands", [prev.get("command", "")]) + commands
        started = prev.get("started", started)  # the table's first invocation
        profiles = _union(prev["config"]["profiles"], profiles, list(PROFILES_MBIT))
        regimes = _union(prev["config"]["regimes"], regimes, ["shared", "perflow"])
        payloads = _union(prev["config"]["payloads"], payloads, ["compressed", "raw"])
        methods = _union(prev["config"]["methods"], methods, list(METHODS))
        node_counts = sorted(set(prev["config"]["nodes"]) | set(node_counts))
        scale = {**prev["config"]["scale"], **scale}
        t0 -= float(prev.get("elapsed_s", 0.0))
    summary = summarize_runs(runs)
    data = {
        "benchmark": "table4",
        "note": NO_NETEM,
        "command": " ; ".join(commands),
        "commands": commands,
        "started": started,
        "elapsed_s": time.monotonic() - t0,
        "machine": machine_info(),
        "config": {"profiles": profiles, "regimes": regimes, "payloads": payloads,
                   "nodes": node_counts, "methods": methods, "repeats": a.repeats,
                   "scale": scale, "slices": a.slices, "rows": a.rows, "cols": a.cols,
                   "flow_cap_frac": a.flow_cap, "tls": not a.plaintext,
                   "connections_per_node": a.connections, "link_mbit": PROFILES_MBIT},
        "shapes": shapes,
        "paper_seconds": PAPER,
        "summary": summary,
        "targets": check_targets(summary, a.flow_cap, a.connections),
        "errors": errors,
        "runs": [{**asdict(r), "goodput_mbit": r.goodput_mbit, "full_series_s": r.full_s}
                 for r in runs],
    }
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / f"{a.name}.json", data)
    (a.out / f"{a.name}.md").write_text(render_md(data, a.name))
    chart(data, a.out / f"{a.name}.png")
    print((a.out / f"{a.name}.md").read_text())
    return 1 if errors else 0


if __name__ == "__main__":
    run_cli(main, "table4: interrupted; the lab and the work directory were removed, no results "
            "written")
