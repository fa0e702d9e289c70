"""Where the uploader's time and memory go on loopback: CPU seconds per process and peak RSS.

    .venv/bin/python bench/uploadcpu.py                     # 360-slice raw series, 1 and 5 nodes
    .venv/bin/python bench/uploadcpu.py --slices 976 --nodes 5 --tls

For each case: transferd x N (storage on tmpfs) started and left idle until their start-up CPU is
counted, then one ``transfer upload`` of the series timed by GNU time. Reported per case: wall
seconds, the uploader's user+sys CPU seconds and peak RSS, its own report's scan seconds (DICOM
header parse + SHA-256 before the first byte is sent) and transfer seconds, and the daemons' CPU
seconds spent on the upload (total minus what each had used at idle after start-up). Variants
with glibc malloc tunables (``--malloc``) show how much of the peak RSS is allocator retention.
Writes bench/results/uploadcpu.json and .md. A diagnostic, not a target check.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    REPO,
    BenchError,
    Transferd,
    machine_info,
    make_pki,
    need_tool,
    run_timed,
    series,
    tail,
    write_json,
)

TCK = os.sysconf("SC_CLK_TCK")
MALLOC = {"none": {}, "arena1": {"MALLOC_ARENA_MAX": "1"},
          "mmap256k": {"MALLOC_MMAP_THRESHOLD_": "262144"}}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


def one_case(src: Path, work: Path, nodes: int, tls: bool, malloc: str) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    conf = work / "transfer.toml"
    cert: tuple[Path, Path] | None = None
    token: Path | None = None
    if tls:
        ca, certs = make_pki(work / "pki-state", [("bench-node", "127.0.0.1")])
        cert = certs["bench-node"]
        token = work / "token"
        token.write_text(secrets.token_hex(32) + "\n")
        token.chmod(0o600)
        conf.write_text(f'[transfer]\nca_file = "{ca}"\ntoken_file = "{token}"\n')
    else:
        conf.write_text("[transfer]\n")
    daemons: list[Transferd] = []
    try:
        for i in range(nodes):
            d = Transferd(work / f"node{i + 1}", tls=cert, token_file=token)
            d.workdir.mkdir()
            daemons.append(d.start())
        time.sleep(0.5)
        idle = [cpu_seconds(d.proc.pid) for d in daemons if d.proc is not None]
        report = work / "report.json"
        argv = [need_tool("transfer"), "upload", str(src), "--config", str(conf), "--nodes",
                ",".join(d.address for d in daemons), "--json-report", str(report)]
        if not tls:
            argv.append("--insecure-plaintext")
        gnu = ["/usr/bin/time", "-q", "-f", "%U %S %M", "-o", str(work / "time.txt")]
        res = run_timed([*gnu, *argv], env=MALLOC[malloc])
        if res.returncode != 0:
            raise BenchError(f"upload exited {res.returncode}: {tail(res.stderr)}")
        busy = [cpu_seconds(d.proc.pid) for d in daemons if d.proc is not None]
    finally:
        for d in daemons:
            d.stop()
    user, sys_s, rss_kb = (work / "time.txt").read_text().split()[-3:]
    rep = json.loads(report.read_text())
    out = {
        "nodes": nodes, "tls": tls, "malloc": malloc, "env": MALLOC[malloc],
        "wall_s": round(res.seconds, 3),
        "client_user_s": float(user), "client_sys_s": float(sys_s),
        "client_rss_mb": round(int(rss_kb) / 1024, 1),
        "scan_s": rep.get("scan_seconds"), "transfer_s": rep.get("seconds"),
        "daemon_startup_cpu_s": round(sum(idle), 2),
        "daemon_upload_cpu_s": round(sum(b - i for b, i in zip(busy, idle, strict=True)), 2),
        "bytes": rep["total"]["bytes"],
    }
    shutil.rmtree(work, ignore_errors=True)
    return out


def render_md(data: dict[str, Any]) -> str:
    c = data["config"]
    lines = [
        "# Uploader CPU and memory on loopback (diagnostic)", "",
        f"Series: {c['slices']} {c.get('kind', 'raw')} slices {c['rows']}x{c['cols']}, {c['series_mb']:.0f} MB on tmpfs; "
        f"{c['repeats']} repeat(s) per case, figures are the median run by wall time. "
        f"Command: `{data['command']}`; run at {data['started']}, load average at start "
        f"{data['machine']['loadavg_start'][0]:.2f}, {data['machine']['cpus']} CPUs.", "",
        "| nodes | security | malloc env | wall s | scan s | transfer s | uploader CPU s "
        "(user+sys) | daemons' CPU s for the upload | uploader peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["cases"]:
        env = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "-"
        lines.append(
            f"| {r['nodes']} | {'TLS + token' if r['tls'] else 'plaintext'} | {env} | "
            f"{r['wall_s']:.2f} | {r['scan_s']:.2f} | {r['transfer_s']:.2f} | "
            f"{r['client_user_s'] + r['client_sys_s']:.2f} ({r['client_user_s']:.2f}+"
            f"{r['client_sys_s']:.2f}) | {r['daemon_upload_cpu_s']:.2f} | "
            f"{r['client_rss_mb']:.0f} |")
    lines += ["", f"Idle daemons' start-up CPU (not counted above): "
              f"{data['cases'][0]['daemon_startup_cpu_s'] / data['cases'][0]['nodes']:.2f} s "
              "per daemon."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Writes "
                                "bench/results/uploadcpu.{json,md}.")
    p.add_argument("--slices", type=int, default=360)
    p.add_argument("--rows", type=int, default=640)
    p.add_argument("--cols", type=int, default=640)
    p.add_argument("--kind", choices=("raw", "compressed"), default="raw",
                   help="raw slices (default) or the RLE-compressed series of table4's "
                        "'compressed' payload (about 220 KB a slice)")
    p.add_argument("--nodes", default="1,5", help="node counts (default 1,5)")
    p.add_argument("--tls", action="store_true", help="only TLS + token (default: both)")
    p.add_argument("--malloc", default="none,mmap256k",
                   help=f"comma-separated subset of {','.join(MALLOC)} (glibc tunables for "
                        "the uploader)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tmp", type=Path, default=Path("/dev/shm"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default="uploadcpu")
    a = p.parse_args(argv)
    mallocs = [m.strip() for m in a.malloc.split(",") if m.strip()]
    bad = [m for m in mallocs if m not in MALLOC]
    if bad:
        p.error(f"unknown --malloc {bad}; choose from {', '.join(MALLOC)}")
    nodes = [int(n) for n in a.nodes.split(",") if n.strip()]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = machine_info()
    files = series(a.tmp / "medstream-bench-cache", slices=a.slices, kind=a.kind, rows=a.rows,
                   cols=a.cols, seed=1 if a.slices > 360 else 0)  # the series loopback.py uses
    src = files[0].parent
    work = a.tmp / f"medstream-uploadcpu-{os.getpid()}"
    cases: list[dict[str, Any]] = []
    try:
        for n in nodes:
            for tls in ((True,) if a.tls else (False, True)):
                for m in mallocs:
                    runs = [one_case(src, work, n, tls, m) for _ in range(a.repeats)]
                    runs.sort(key=lambda r: r["wall_s"])
                    best = runs[len(runs) // 2]
                    best["all_wall_s"] = [r["wall_s"] for r in runs]
                    best["all_rss_mb"] = [r["client_rss_mb"] for r in runs]
                    cases.append(best)
                    print(f"nodes {n} {'tls' if tls else 'plain'} {m}: {best['wall_s']:.2f} s, "
                          f"uploader CPU {best['client_user_s'] + best['client_sys_s']:.2f} s, "
                          f"daemons {best['daemon_upload_cpu_s']:.2f} s, "
                          f"RSS {best['client_rss_mb']:.0f} MB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data = {"benchmark": "uploadcpu",
            "command": " ".join(["bench/uploadcpu.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "started": started, "machine": machine,
            "config": {"slices": a.slices, "kind": a.kind, "rows": a.rows, "cols": a.cols,
                       "series_mb": sum(f.stat().st_size for f in files) / 1e6,
                       "repeats": a.repeats},
            "cases": cases}
    write_json(a.out / f"{a.name}.json", data)
    (a.out / f"{a.name}.md").write_text(render_md(data))
    print((a.out / f"{a.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
