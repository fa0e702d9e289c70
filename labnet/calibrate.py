"""Measure what the shaping really delivers on this machine; write JSON and a Markdown table.

    python -m labnet.calibrate [--out labnet/results/calibration.json] [--seconds 3]

A workstation host and 5 node hosts; the workstation's access link is shaped with each profile
in each regime; goodput is timed at the receivers (labnet.measure). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .lab import Lab
from .measure import Measurement, measure
from .shaping import PROFILES, perflow_bucket


def _buckets(m: Measurement) -> tuple[int, int]:
    """(flows, distinct perflow buckets) from the receivers' view of the ports."""
    seen = []
    for r in m.receivers.values():
        for f in r["flows"]:
            src, sport = f["peer"].rsplit(":", 1)
            seen.append(perflow_bucket(src, r["ip"], int(sport), r["port"]))
    return len(seen), len(set(seen))


def run(seconds: float, progress: bool = True) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []

    def note(case: dict[str, Any], m: Measurement, rate: float | None) -> None:
        flows = m.flow_mbps()
        hosts = sorted(m.host_mbps().values())
        row = {**case, "mbps": round(m.total_mbps, 3),
               "pct_of_link": round(100 * m.total_mbps / rate, 1) if rate else None,
               "flow_min": round(flows[0], 3), "flow_max": round(flows[-1], 3),
               "host_min": round(hosts[0], 3), "host_max": round(hosts[-1], 3),
               "drain_s": round(m.sender["wall"] - case["seconds"], 2)}
        if case.get("regime") == "perflow":
            row["flows"], row["buckets"] = _buckets(m)
        rows.append(row)
        if progress:
            print(json.dumps(row), file=sys.stderr, flush=True)

    with Lab.create() as lab:
        ws, *nodes = lab.add_hosts(["ws"] + [f"node-{i:02d}" for i in range(1, 6)])
        case: dict[str, Any] = {"profile": "unshaped", "regime": "-", "case": "1 node, 1 flow",
                                "seconds": 2.0}
        note(case, measure(ws, nodes[:1], seconds=2.0), None)
        for profile, rate in PROFILES.items():
            secs = seconds * (2 if rate < 10**7 else 1)
            lab.shape(ws, profile, "shared")
            for label, dsts, flows in (("1 node, 1 flow", nodes[:1], 1),
                                       ("5 nodes, 1 flow each", nodes, 1),
                                       ("5 nodes, 4 flows each", nodes, 4)):
                case = {"profile": profile, "regime": "shared", "case": label, "seconds": secs}
                note(case, measure(ws, dsts, seconds=secs, flows=flows), rate / 1e6)
            case = {"profile": profile, "regime": "shared", "case": "download, 1 node, 1 flow",
                    "seconds": secs}
            note(case, measure(nodes[0], [ws], seconds=secs), rate / 1e6)
            lab.shape(ws, profile, "perflow")
            for label, dsts, flows in (("1 node, 1 flow", nodes[:1], 1),
                                       ("1 node, 4 flows", nodes[:1], 4),
                                       ("5 nodes, 1 flow each", nodes, 1),
                                       ("5 nodes, 4 flows each", nodes, 4)):
                case = {"profile": profile, "regime": "perflow", "case": label, "seconds": secs}
                note(case, measure(ws, dsts, seconds=secs, flows=flows), rate / 1e6)
        netem = lab.netem_available
    return {"kernel": platform.release(), "netem": netem, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ",
            time.gmtime()), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| profile | regime | case | goodput Mbit/s | % of link | per flow min-max | per node min-max | drain s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pct = f"{r['pct_of_link']}" if r["pct_of_link"] is not None else "-"
        extra = f" ({r['buckets']} buckets for {r['flows']} flows)" if "buckets" in r else ""
        lines.append(f"| {r['profile']} | {r['regime']} | {r['case']}{extra} | {r['mbps']:.2f} | {pct} | "
                     f"{r['flow_min']:.2f}-{r['flow_max']:.2f} | {r['host_min']:.2f}-{r['host_max']:.2f} | "
                     f"{r['drain_s']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labnet.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="labnet/results/calibration.json")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (x2 on adsl)")
    args = ap.parse_args(argv)
    result = run(args.seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    print(f"netem: {'available' if result['netem'] else 'ABSENT (rate shaping only)'}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
