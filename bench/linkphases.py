"""Where a tool's time goes on one shaped lab link: its streaming phase, the rest, and TCP's
retransmissions (a diagnostic for Table 4's ">= FTP" rows, not a target check).

    sudo .venv/bin/python bench/linkphases.py --profile tanet --scale 0.25
    sudo .venv/bin/python bench/linkphases.py --profile adsl --scale 0.03 --connections 1,2,4

The lab and the methods are :mod:`bench.table4`'s (one node, the workstation's link shaped in
the ``shared`` regime by default). During each run the workstation's switch port byte counter
is sampled every 0.5 ms: the streaming phase runs from the moment 16 KiB have crossed the link
(handshakes are smaller) to the moment its last byte did. What the tool's own time holds beyond
that phase is start-up (connecting, TLS, login or resume check, the first file) and the end
(the last acknowledgement or reply, closing). TCP counters are read from the workstation's
namespace before and after: segments retransmitted, retransmission timeouts (and how many of
them the kernel found spurious), tail-loss probes. Writes bench/results/linkphases.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    REPO,
    BenchError,
    code_version,
    machine_info,
    run_cli,
    run_timed,
    series,
    tail,
    write_json,
)
from bench.table4 import NO_NETEM, PROFILES_MBIT, Bench, relabel  # noqa: E402

STREAM_FROM = 16 << 10  # bytes across the link before the streaming phase counts as begun
SAMPLE_S = 0.0005
TCP_EXT = ("TCPTimeouts", "TCPSpuriousRTOs", "TCPLossProbes")


class Sampler:
    """Samples one byte counter (a sysfs file) in a thread until stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        return int(self.path.read_text())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._read()))
            time.sleep(SAMPLE_S)

    def __enter__(self) -> Sampler:
        self.samples.append((time.monotonic(), self._read()))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append((time.monotonic(), self._read()))

    def phase(self) -> tuple[int, float, float]:
        """(bytes, start, end): the total across the link and the monotonic times at which
        STREAM_FROM bytes (or all, if fewer crossed) and the last byte had crossed it."""
        base = self.samples[0][1]
        total = self.samples[-1][1] - base
        start = next(t for t, v in self.samples if v - base >= min(STREAM_FROM, total))
        end = next(t for t, v in self.samples if v - base >= total)
        return total, start, end


def tcp_counters(host: Any) -> dict[str, int]:
    """The workstation namespace's TCP counters that tell retransmissions apart."""
    out: dict[str, int] = {}
    for path, prefix in (("/proc/net/snmp", "Tcp:"), ("/proc/net/netstat", "TcpExt:")):
        rows = [ln.split() for ln in host.run(["cat", path]).stdout.splitlines()
                if ln.startswith(prefix)]
        if len(rows) >= 2:
            out.update(zip(rows[0][1:], map(int, rows[1][1:]), strict=False))
    keep = ("OutSegs", "RetransSegs", *TCP_EXT)
    return {k: out.get(k, 0) for k in keep}


def ms(v: float | None) -> str:
    """Seconds as milliseconds for the tables, "-" where the tool did not report the figure."""
    return "-" if v is None else f"{1000 * v:.1f}"


def qdisc_drops(host: Any) -> int:
    text = host.run(["tc", "-s", "qdisc", "show", "dev", host.dev]).stdout
    return sum(int(n) for n in re.findall(r"dropped (\d+)", text))


def run_one(b: Bench, profile: str, method: str, files: list[Path], tag: int,
            payload: str) -> dict[str, Any]:
    work = b.base / f"run{tag}"
    src = work / "series"
    try:
        copy = relabel(files, src, tag)
        nbytes = sum(p.stat().st_size for p in copy)
        report = work / "report.json"
        rate = PROFILES_MBIT[profile] * 1e6 / 8
        before, drops = tcp_counters(b.ws), qdisc_drops(b.ws)
        port = Path(f"/sys/class/net/{b.ws.veth}/statistics/rx_bytes")
        with Sampler(port) as s:
            res = run_timed(b.argv(method, 1, src, copy, report, tag, payload), spawn=b.ws.popen,
                            timeout=120 + 4 * nbytes / rate)
        if res.returncode != 0:
            raise BenchError(f"{method}: exit {res.returncode}: {tail(res.stderr or res.stdout)}")
        after = tcp_counters(b.ws)
        out = json.loads(report.read_text() if report.exists() else res.stdout)
        tool = float(out["seconds"])
        phases = out.get("phases") or {}
        wire, start, end = s.phase()
        streaming = end - start
        return {
            "method": method, "files": len(copy), "bytes": nbytes, "tool_s": tool,
            "wall_s": res.seconds, "streaming_s": streaming, "outside_s": tool - streaming,
            "first_file_s": phases.get("first_file_s"), "closing_s": phases.get("closing_s"),
            "link_s": nbytes / rate, "goodput_pct_link": 100 * nbytes / rate / tool,
            "link_bytes": wire, "link_bytes_per_payload": wire / nbytes,
            "qdisc_drops": qdisc_drops(b.ws) - drops,
            **{k: after[k] - before[k] for k in after},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        b.wipe()


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        row: dict[str, Any] = {"label": label, "runs": len(rs)}
        for k in ("tool_s", "streaming_s", "outside_s", "goodput_pct_link",
                  "link_bytes_per_payload", "RetransSegs", *TCP_EXT, "qdisc_drops"):
            row[k] = statistics.fmean(r[k] for r in rs)
        for k in ("first_file_s", "closing_s"):  # the tool's own split, where it reports one
            got = [r[k] for r in rs if r.get(k) is not None]
            row[k] = statistics.fmean(got) if len(got) == len(rs) else None
        out.append(row)
    return out


def render_md(data: dict[str, Any]) -> str:
    c = data["config"]
    lines = [
        "# Where the time goes on one shaped link",
        "",
        f"Profile {c['profile']} ({PROFILES_MBIT[c['profile']]:g} Mbit/s), regime {c['regime']}, "
        f"payload {c['payload']}, one node, {c['files']} slices, {c['repeats']} repeats, "
        f"transfer code {data['code']}. {NO_NETEM}.",
        "",
        f"Link: {data.get('link') or 'not recorded (the workstation sent GSO aggregates)'}.",
        "",
        "Streaming phase: from 16 KiB across the workstation's link to its last byte. Outside: "
        "the tool's own time minus that phase (start-up and end). Bytes on the link per payload "
        "byte count every header (Ethernet, IP, TCP, TLS, protocol) and every retransmission. "
        "TCP counters are per run, from the workstation's namespace. The tool's own split of its "
        "time: until its first file began (connecting, TLS, login or HELLO and resume check) and "
        "after its last file's reply or acknowledgement (closing: QUIT, BYE and TLS shutdown).",
        "",
        "| method | tool s | streaming s | outside ms | to first file ms | closing ms | "
        "% of link | link bytes / payload | retrans segs | RTOs (spurious) | loss probes | "
        "qdisc drops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["summary"]:
        lines.append(
            f"| {r['label']} | {r['tool_s']:.3f} | {r['streaming_s']:.3f} | "
            f"{1000 * r['outside_s']:.1f} | {ms(r.get('first_file_s'))} | "
            f"{ms(r.get('closing_s'))} | {r['goodput_pct_link']:.2f} | "
            f"{r['link_bytes_per_payload']:.4f} | {r['RetransSegs']:.1f} | "
            f"{r['TCPTimeouts']:.1f} ({r['TCPSpuriousRTOs']:.1f}) | {r['TCPLossProbes']:.1f} | "
            f"{r['qdisc_drops']:.1f} |")
    lines += ["", f"Command: `{data['command']}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--profile", default="tanet", choices=list(PROFILES_MBIT))
    p.add_argument("--regime", default="shared", choices=["shared", "perflow"])
    p.add_argument("--payload", default="compressed", choices=["compressed", "raw"])
    p.add_argument("--methods", default="medstream,ftp",
                   help="subset of medstream,ftp,ftps (default medstream,ftp)")
    p.add_argument("--connections", default="4",
                   help="medstream's connections to the node, one run each per value "
                        "(e.g. 1,2,4; default 4, the uploader's default)")
    p.add_argument("--scale", type=float, default=0.25, help="fraction of the series to send")
    p.add_argument("--slices", type=int, default=360)
    p.add_argument("--rows", type=int, default=640)
    p.add_argument("--cols", type=int, default=640)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tmp", type=Path, default=Path("/dev/shm"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default="linkphases")
    p.add_argument("--keep-gso", action="store_true",
                   help="let the workstation send GSO aggregates through the shaped link, as the "
                        "lab did before it sent MTU-sized packets on slow links")
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in ("medstream", "ftp", "ftps")]
    if bad:
        p.error(f"unknown method(s) {bad}: choose from medstream, ftp, ftps")
    try:
        conns = [int(c) for c in a.connections.split(",") if c]
    except ValueError:
        p.error("--connections takes comma-separated integers")
    if not conns or min(conns) < 1:
        p.error("--connections needs values of at least 1")
    if not 0 < a.scale <= 1:
        p.error("--scale must be in (0, 1]")
    if os.geteuid() != 0:
        print("linkphases: needs root (network namespaces, htb)", file=sys.stderr)
        return 2
    from labnet import Lab

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"linkphases: {NO_NETEM}", flush=True)
    files = series(a.tmp / "medstream-bench-cache", slices=a.slices, kind=a.payload, rows=a.rows,
                   cols=a.cols)
    files = files[: max(1, round(len(files) * a.scale))]
    base = a.tmp / f"medstream-linkphases-{os.getpid()}"
    runs: list[dict[str, Any]] = []
    link = ""
    variants = [(m, c) for m in methods for c in (conns if m == "medstream" else [0])]
    try:
        base.mkdir(parents=True)
        with Lab.create() as lab:
            tag = 0
            # One lab, one node; the connection count only changes the uploader's argv.
            bench = Bench(lab, 1, base, tls=True, connections=conns[0])
            bench.start_servers()
            shape = lab.shape(bench.ws, profile=a.profile, regime=a.regime,
                              flow_cap=int(PROFILES_MBIT[a.profile] * 1e6 / 8),
                              mtu_segments=False if a.keep_gso else None)
            link = shape.describe()
            print(f"== {link}", flush=True)
            for r in range(a.repeats):
                for method, c in variants:
                    tag += 1
                    if c:
                        bench.connections = c
                    label = f"{method} ({c} connection{'s' if c > 1 else ''})" if c else method
                    run = run_one(bench, a.profile, method, files, tag, a.payload)
                    run.update(label=label, repeat=r)
                    runs.append(run)
                    print(f"   {label:<28} r{r + 1}: tool {run['tool_s']:.3f} s, streaming "
                          f"{run['streaming_s']:.3f} s, outside {1000 * run['outside_s']:.1f} ms "
                          f"(first file {ms(run['first_file_s'])}, closing "
                          f"{ms(run['closing_s'])}), "
                          f"{run['goodput_pct_link']:.2f}% of link, retrans "
                          f"{run['RetransSegs']}, RTOs {run['TCPTimeouts']} "
                          f"(spurious {run['TCPSpuriousRTOs']})", flush=True)
            lab.unshape(bench.ws)
            bench.stop_servers()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    data = {
        "benchmark": "linkphases",
        "note": NO_NETEM,
        "command": " ".join(["bench/linkphases.py", *(argv if argv is not None
                                                      else sys.argv[1:])]),
        "code": code_version(),
        "machine": machine_info(),
        "link": link,
        "config": {"profile": a.profile, "regime": a.regime, "payload": a.payload,
                   "files": len(files), "repeats": a.repeats, "methods": methods,
                   "connections": conns, "stream_from_bytes": STREAM_FROM},
        "summary": summarize(runs),
        "runs": runs,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / f"{a.name}.json", data)
    (a.out / f"{a.name}.md").write_text(render_md(data))
    print((a.out / f"{a.name}.md").read_text())
    return 0


if __name__ == "__main__":
    run_cli(main, "linkphases: interrupted; the lab and the work directory were removed, no "
            "results written")
