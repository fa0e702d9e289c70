"""Loopback benchmark: a CT series into medstream daemons, vsftpd and dcmtk storescp, side by side.

    .venv/bin/python bench/loopback.py                 # 360 x 640x640 raw (295 MB), 5 repeats
    .venv/bin/python bench/loopback.py --repeats 3 --rss-slices 976

Every method sends the same files from tmpfs to servers on 127.0.0.1 whose storage is on tmpfs,
and is timed from the client's spawn to its exit (what a user waits for). The methods run
interleaved within each repeat (rotating order), each repeat with fresh servers and empty storage,
so the shared machine's noise spreads over all of them. Reported: median MB/s (10^6 bytes of DICOM
files per second), mean/sd, the client's peak RSS (wait4), and the ratios the targets talk about.

Methods:
  medstream-tls-N    transferd x N (TLS + token, as deployed) <- transfer upload
  medstream-plain-N  the same with --insecure-plaintext on both ends (labelled: like-for-like
                     with FTP, which is plaintext too)
  medstream-tls-zstd-N  TLS + token + zstd bodies
  vsftpd-K           vsftpd (Debian, anonymous upload) <- Python ftplib, K parallel connections
  vsftps-K           the same over explicit FTPS (AUTH TLS, PROT P, the server verified): the
                     encrypted alternative, like for like with medstream-tls-K
  dcmtk-K            dcmtk storescp --fork (TCP_NODELAY=1, max PDU 128 KiB) <- K storescu processes
  ceiling-sha256-N   bench/ceiling.py: the least a Python data path with issue 2's integrity
                     check can do (name, size, body; SHA-256 on both ends; a digest back per
                     file), into N receiver processes, one connection each; no TLS, fsync,
                     rename, index or DICOM validation. The bound for medstream on this machine.
  ceiling-none-N     the same without hashing: what copies and sockets alone cost

Peak RSS of the uploader for a larger series (--rss-slices, default 976 slices = 800 MB) is
measured once, uploading to 5 TLS nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    free_port,
    local_popen,
    machine_info,
    make_pki,
    need_tool,
    run_cli,
    run_timed,
    scratch,
    series,
    stop,
    storescu_argv,
    summarize,
    tail,
    tree_stats,
    wait_port,
    write_json,
)

DCMTK_ENV = {"TCP_NODELAY": "1"}  # dcmtk leaves Nagle on by default (FAQ #48)
FTPPUT = Path(__file__).resolve().parent / "ftpput.py"
ALL_METHODS = (
    "medstream-tls-1", "medstream-tls-5", "medstream-plain-1", "medstream-plain-5",
    "medstream-tls-zstd-5", "vsftpd-1", "vsftpd-5", "vsftps-1", "vsftps-5", "dcmtk-1", "dcmtk-5",
    "ceiling-sha256-1", "ceiling-sha256-5", "ceiling-none-5",
)
CEILING = Path(__file__).resolve().parent / "ceiling.py"


@dataclass
class Sample:
    method: str
    repeat: int
    seconds: float
    bytes: int
    files: int
    mbps: float
    client_rss_mb: float
    stored_files: int
    stored_bytes: int
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ctx:
    files: list[Path]
    src_dir: Path
    tmp: Path
    kind: str
    pki: tuple[Path, Path, Path] | None = None   # (ca, cert, key)
    token: Path | None = None
    timeout: float = 1800.0


def _parse(method: str) -> tuple[str, int, set[str]]:
    parts = method.split("-")
    return parts[0], int(parts[-1]), set(parts[1:-1])


def _tls_setup(ctx: Ctx) -> tuple[Path, Path, Path, Path]:
    if ctx.pki is None or ctx.token is None:
        base = ctx.tmp / "pki-state"
        base.mkdir(parents=True, exist_ok=True)
        ca, certs = make_pki(base, [("bench-node", "127.0.0.1")])
        token = base / "token"
        if not token.exists():
            token.write_text(secrets.token_hex(32) + "\n")
            token.chmod(0o600)
        ctx.pki = (ca, *certs["bench-node"])
        ctx.token = token
    return (*ctx.pki, ctx.token)


def run_medstream(ctx: Ctx, method: str, repeat: int, *, files_dir: Path | None = None,
                  expect: int | None = None) -> Sample:
    _, n, flags = _parse(method)
    tls = "tls" in flags
    src = files_dir or ctx.src_dir
    with scratch(ctx.tmp, f"run-{method}") as work:
        daemons: list[Transferd] = []
        conf = work / "transfer.toml"
        argv = [need_tool("transfer"), "upload", str(src), "--config", str(conf)]
        cert: tuple[Path, Path] | None = None
        token: Path | None = None
        try:
            if tls:
                ca, crt, key, token = _tls_setup(ctx)
                cert = (crt, key)
                conf.write_text(f'[transfer]\nca_file = "{ca}"\ntoken_file = "{token}"\n')
            else:
                conf.write_text("[transfer]\n")
            for i in range(n):
                d = Transferd(work / f"node{i + 1}", tls=cert, token_file=token)
                d.workdir.mkdir()
                daemons.append(d.start())
            argv += ["--nodes", ",".join(d.address for d in daemons)]
            if not tls:
                argv.append("--insecure-plaintext")
            if "zstd" in flags:
                argv.append("--zstd")
            report = work / "report.json"
            argv += ["--json-report", str(report)]
            res = run_timed(argv, timeout=ctx.timeout)
            if res.returncode != 0:
                raise BenchError(f"{method}: transfer upload exited {res.returncode}: "
                                 f"{tail(res.stderr or res.stdout)}")
            rep = json.loads(report.read_text()) if report.exists() else {}
            nfiles = nbytes = 0
            for d in daemons:
                f, b = tree_stats(d.storage, ".dcm")
                nfiles += f
                nbytes += b
        finally:
            for d in daemons:
                d.stop()
    return _sample(ctx, method, repeat, res.seconds, res.maxrss_kb, nfiles, nbytes, rep,
                   files=expect)


def run_vsftpd(ctx: Ctx, method: str, repeat: int) -> Sample:
    name, k, _ = _parse(method)
    tls: list[str] = []
    cert: tuple[Path, Path] | None = None
    if name == "vsftps":
        ca, crt, key, _ = _tls_setup(ctx)
        tls, cert = ["--tls", str(ca)], (crt, key)
    with scratch(ctx.tmp, f"run-{method}") as work:
        server = Vsftpd(work, tls=cert).start()
        try:
            argv = [PY, str(FTPPUT), server.bind, str(server.port), "incoming/series",
                    *map(str, ctx.files), "--connections", str(k), *tls, "--json"]
            res = run_timed(argv, timeout=ctx.timeout)
            if res.returncode != 0:
                raise BenchError(f"{method}: ftp upload failed: {tail(res.stderr)}")
            nfiles, nbytes = tree_stats(server.incoming)
        finally:
            server.stop()
    return _sample(ctx, method, repeat, res.seconds, res.maxrss_kb, nfiles, nbytes,
                   json.loads(res.stdout))


def run_dcmtk(ctx: Ctx, method: str, repeat: int) -> Sample:
    _, k, _ = _parse(method)
    with scratch(ctx.tmp, f"run-{method}") as work:
        server = Storescp(work).start()
        try:
            shares = [share for i in range(k) if (share := ctx.files[i::k])]
            argvs = [storescu_argv(server.host, server.port, share, rle=ctx.kind == "compressed")
                     for share in shares]
            if len(shares) == 1:
                res = run_timed(argvs[0], env=DCMTK_ENV, timeout=ctx.timeout)
                seconds, rss, rcs, errs = res.seconds, res.maxrss_kb, [res.returncode], res.stderr
            else:
                seconds, rss, rcs, errs = _parallel(argvs, ctx.timeout, DCMTK_ENV)
            if any(rcs):
                raise BenchError(f"{method}: storescu exit codes {rcs}: {tail(errs)}")
            nfiles, nbytes = tree_stats(server.out)
        finally:
            server.stop()
    return _sample(ctx, method, repeat, seconds, rss, nfiles, nbytes, {})


def _parallel(argvs: Sequence[Sequence[str]], timeout: float,
              env: dict[str, str] | None = None) -> tuple[float, int, list[int], str]:
    """K client processes at once; wall time from the first spawn to the last exit."""
    import threading

    results: list[Any] = [None] * len(argvs)

    def one(i: int) -> None:
        try:
            results[i] = run_timed(argvs[i], env=env, timeout=timeout)
        except BenchError as exc:
            results[i] = exc

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(argvs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    seconds = time.perf_counter() - started
    errs = [r for r in results if not hasattr(r, "returncode")]
    if errs:
        raise BenchError(str(errs[0]))
    return (seconds, sum(r.maxrss_kb for r in results), [r.returncode for r in results],
            "\n".join(r.stderr for r in results))


def _sample(ctx: Ctx, method: str, repeat: int, seconds: float, rss_kb: int, nfiles: int,
            nbytes: int, report: dict[str, Any], files: int | None = None) -> Sample:
    total = sum(p.stat().st_size for p in ctx.files) if files is None else 0
    want = len(ctx.files) if files is None else files
    if nfiles != want:
        raise BenchError(f"{method}: {nfiles} files stored, expected {want}")
    return Sample(method=method, repeat=repeat, seconds=seconds, bytes=total or nbytes,
                  files=want, mbps=(total or nbytes) / seconds / 1e6,
                  client_rss_mb=rss_kb / 1024, stored_files=nfiles, stored_bytes=nbytes,
                  report=report)


def run_ceiling(ctx: Ctx, method: str, repeat: int) -> Sample:
    _, n, flags = _parse(method)
    hashed = ["--hash"] if "sha256" in flags else []
    with scratch(ctx.tmp, f"run-{method}") as work:
        procs: list[Any] = []
        ports: list[int] = []
        try:
            for i in range(n):
                port = free_port()
                procs.append(local_popen([PY, str(CEILING), "serve", str(port), str(work / f"n{i}"),
                                          *hashed], stdin=subprocess.DEVNULL))
                wait_port("127.0.0.1", port, proc=procs[-1])
                ports.append(port)
            argv = [PY, str(CEILING), "send", ",".join(f"127.0.0.1:{p}" for p in ports),
                    *map(str, ctx.files), *hashed]
            res = run_timed(argv, timeout=ctx.timeout)
            if res.returncode != 0:
                raise BenchError(f"{method}: ceiling sender failed: {tail(res.stderr)}")
            nfiles, nbytes = tree_stats(work)
        finally:
            for proc in procs:
                stop(proc)
    return _sample(ctx, method, repeat, res.seconds, res.maxrss_kb, nfiles, nbytes,
                   json.loads(res.stdout))


RUNNERS: dict[str, Callable[[Ctx, str, int], Sample]] = {
    "medstream": run_medstream, "vsftpd": run_vsftpd, "vsftps": run_vsftpd, "dcmtk": run_dcmtk,
    "ceiling": run_ceiling,
}


def ratios(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    def med(m: str) -> float | None:
        s = summary.get(m)
        return s["median"] if s else None

    out: dict[str, float] = {}
    best_ftp = max((v for v in (med("vsftpd-1"), med("vsftpd-5")) if v), default=None)
    best_dcm = max((v for v in (med("dcmtk-1"), med("dcmtk-5")) if v), default=None)
    for ms in ("medstream-tls-1", "medstream-tls-5", "medstream-plain-1", "medstream-plain-5",
               "medstream-tls-zstd-5"):
        v = med(ms)
        if not v:
            continue
        if best_ftp:
            out[f"{ms} / best vsftpd"] = v / best_ftp
        if best_dcm:
            out[f"{ms} / best dcmtk"] = v / best_dcm
    best_ceiling = max((v for v in (med("ceiling-sha256-1"), med("ceiling-sha256-5")) if v),
                       default=None)
    if best_ceiling:
        for other, best in (("vsftpd", best_ftp), ("dcmtk", best_dcm)):
            if best:
                out[f"best ceiling-sha256 / best {other}"] = best_ceiling / best
        for ms in ("medstream-tls-5", "medstream-plain-5"):
            if v := med(ms):
                out[f"{ms} / best ceiling-sha256"] = v / best_ceiling
    for a, b in (("medstream-tls-1", "vsftpd-1"), ("medstream-tls-5", "vsftpd-5"),
                 ("medstream-tls-1", "vsftps-1"), ("medstream-tls-5", "vsftps-5"),
                 ("medstream-plain-1", "vsftpd-1"), ("medstream-plain-5", "vsftpd-5"),
                 ("medstream-tls-1", "dcmtk-1"), ("medstream-tls-5", "dcmtk-5"),
                 ("medstream-plain-5", "dcmtk-5")):
        va, vb = med(a), med(b)
        if va and vb:
            out[f"{a} / {b}"] = va / vb
    return out


def render_md(data: dict[str, Any]) -> str:
    cfg = data["config"]
    lines = [
        "# Loopback benchmark: medstream vs vsftpd vs dcmtk",
        "",
        f"Series: {cfg['slices']} slices {cfg['rows']}x{cfg['cols']} 16-bit, kind `{cfg['kind']}`, "
        f"{cfg['series_bytes'] / 1e6:.1f} MB; {cfg['repeats']} repeats, methods interleaved; "
        "all servers on 127.0.0.1 with storage on tmpfs; time = client spawn to exit.",
        f"Command: `{data['command']}`  ",
        f"Run at {data['started']} on {data['machine']['cpus']} CPUs "
        f"(load average at start {data['machine']['loadavg_start'][0]:.2f}; absolute figures "
        "move between runs with the machine's load, the ratios much less).",
        "",
        "| method | security | median MB/s | mean ± sd MB/s | median s | client peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for m, s in data["summary"].items():
        sec = ("TLS + token" if "tls" in m else
               "plaintext, no auth (insecure, for like-for-like)" if "plain" in m else
               "plaintext FTP, anonymous" if m.startswith("vsftpd") else
               "FTPS (TLS), anonymous" if m.startswith("vsftps") else
               "plaintext, no auth (bound, not a product)" if m.startswith("ceiling") else
               "plaintext DICOM")
        if "zstd" in m:
            sec += " + zstd"
        secs = data["seconds"][m]
        lines.append(f"| {m} | {sec} | {s['median']:.1f} | {s['mean']:.1f} ± {s['sd']:.1f} | "
                     f"{secs['median']:.2f} | {data['rss_mb'][m]:.0f} |")
    if data["ratios"]:
        lines += ["", "| ratio (medians) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in data["ratios"].items()]
    t = data.get("targets", {})
    if t:
        lines += ["", "Targets:"]
        lines += [f"- {k}: {'met' if ok else 'MISSED'}" for k, (ok, _) in t.items()]
    rss = data.get("rss_large")
    if rss:
        lines += ["", f"Uploader peak RSS for a {rss['series_mb']:.0f} MB series "
                  f"({rss['slices']} slices, {rss['method']}): **{rss['client_rss_mb']:.0f} MB** "
                  f"(target <= 150 MB) at {rss['mbps']:.0f} MB/s."]
    if data.get("errors"):
        lines += ["", "Errors:"] + [f"- {e}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Upload a generated CT series on loopback with medstream, vsftpd and dcmtk, "
                    "side by side; write bench/results/loopback.json and .md.")
    p.add_argument("--slices", type=int, default=360)
    p.add_argument("--rows", type=int, default=640)
    p.add_argument("--cols", type=int, default=640)
    p.add_argument("--kind", choices=("raw", "compressed"), default="raw")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    p.add_argument("--rss-slices", type=int, default=976,
                   help="slices of the large series for the uploader RSS check (0 = skip; "
                        "976 x 820 KB = 800 MB)")
    p.add_argument("--tmp", type=Path, default=Path("/dev/shm"),
                   help="tmpfs for sources and storage (default /dev/shm)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                   help="directory for loopback.json and loopback.md")
    p.add_argument("--keep-going", action="store_true",
                   help="record a failing method and go on instead of stopping")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {', '.join(ALL_METHODS)}")
    if os.geteuid() != 0:
        print("loopback: note: vsftpd's anonymous upload dir needs root to chown", file=sys.stderr)

    # SIGTERM unwinds like Ctrl-C, so that the servers of the sample in progress are stopped and
    # the work directory removed (a run ended by its PID left a transferd and its tmpfs behind).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    base = a.tmp / f"medstream-bench-{os.getpid()}"
    cache = a.tmp / "medstream-bench-cache"
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    samples: list[Sample] = []
    errors: list[str] = []
    try:
        files = series(cache, slices=a.slices, kind=a.kind, rows=a.rows, cols=a.cols)
        ctx = Ctx(files=files, src_dir=files[0].parent, tmp=base, kind=a.kind)
        total = sum(f.stat().st_size for f in files)
        print(f"series: {len(files)} files, {total / 1e6:.1f} MB", flush=True)
        for r in range(a.repeats):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for m in order:
                try:
                    s = RUNNERS[m.split("-")[0]](ctx, m, r)
                except BenchError as exc:
                    if not a.keep_going:
                        raise
                    errors.append(str(exc))
                    print(f"  [{r + 1}/{a.repeats}] {m}: FAILED {exc}", flush=True)
                    continue
                samples.append(s)
                print(f"  [{r + 1}/{a.repeats}] {m:<22} {s.seconds:7.2f} s {s.mbps:8.1f} MB/s "
                      f"rss {s.client_rss_mb:5.0f} MB", flush=True)
        rss_large = None
        if a.rss_slices > 0 and "medstream-tls-5" in methods:
            big = series(cache, slices=a.rss_slices, kind="raw", rows=640, cols=640, seed=1)
            bctx = Ctx(files=big, src_dir=big[0].parent, tmp=base, kind="raw",
                       pki=ctx.pki, token=ctx.token)
            s = run_medstream(bctx, "medstream-tls-5", 0)
            rss_large = {"method": "medstream-tls-5", "slices": len(big),
                         "series_mb": s.bytes / 1e6, "client_rss_mb": s.client_rss_mb,
                         "mbps": s.mbps, "seconds": s.seconds}
            print(f"  RSS check: {len(big)} slices {s.bytes / 1e6:.0f} MB -> uploader peak RSS "
                  f"{s.client_rss_mb:.0f} MB ({s.mbps:.0f} MB/s)", flush=True)
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)

    summary = {m: summarize([s.mbps for s in samples if s.method == m]) for m in methods
               if any(s.method == m for s in samples)}
    seconds = {m: summarize([s.seconds for s in samples if s.method == m]) for m in summary}
    rss = {m: max(s.client_rss_mb for s in samples if s.method == m) for m in summary}
    rat = ratios(summary)
    targets: dict[str, tuple[bool, float]] = {}
    for ms in ("medstream-tls-5", "medstream-plain-5"):
        if f"{ms} / best vsftpd" in rat:
            v = rat[f"{ms} / best vsftpd"]
            targets[f"{ms} >= best vsftpd ({v:.2f}x)"] = (v >= 1.0, v)
        if f"{ms} / best dcmtk" in rat:
            v = rat[f"{ms} / best dcmtk"]
            targets[f"{ms} >= 1.2 x best dcmtk ({v:.2f}x)"] = (v >= 1.2, v)
    if rss_large:
        v = float(rss_large["client_rss_mb"])  # type: ignore[arg-type]
        targets[f"uploader peak RSS <= 150 MB for {rss_large['series_mb']:.0f} MB ({v:.0f} MB)"] = (
            v <= 150, v)
    data = {
        "benchmark": "loopback",
        "command": " ".join(["bench/loopback.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": started,
        "machine": machine_info(),
        "config": {"slices": a.slices, "rows": a.rows, "cols": a.cols, "kind": a.kind,
                   "repeats": a.repeats, "methods": methods,
                   "series_bytes": sum(f.stat().st_size for f in files) if samples else 0,
                   "mb": "10^6 bytes of DICOM files (as stored on the workstation)"},
        "summary": summary, "seconds": seconds, "rss_mb": rss, "ratios": rat,
        "targets": targets, "rss_large": rss_large, "errors": errors,
        "samples": samples,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "loopback.json", data)
    (a.out / "loopback.md").write_text(render_md(data))
    print((a.out / "loopback.md").read_text())
    return 1 if errors else 0


if __name__ == "__main__":
    run_cli(main, "loopback: interrupted; the servers were stopped and the work directory removed, "
            "no results written")
