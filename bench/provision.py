"""Provisioning benchmark: 0 -> N node VMs with xenctl on xapisim, concurrent vs one at a time.

The simulator runs a realistic latency model (VM.clone 2 s, VM.start_on 5 s, guest IP 10 s after
start, as issue 4 specifies); xenctl talks to it through the real XenAPI SDK over verified HTTPS.
Figures go to bench/results/provision.json and provision.md:

* wall time of ``scale-nodes N`` at the chosen concurrency, and of the same job one VM at a time
  (concurrency 1);
* the slowest single node's critical path (clone -> IP, measured in the one-at-a-time run) and the
  target ``1.5 x slowest x ceil(N / concurrency)``;
* XenAPI calls per node (every request on the wire, logins and reads included), the call mix,
  and the number of polling calls (task.get_status / get_record / guest-metrics reads: 0 expected,
  waits use event.from).

Usage: .venv/bin/python bench/provision.py [--nodes 30] [--concurrency 10] [--latency-scale 1]
       [--skip-serial]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xapisim import SimConfig, SimServer  # noqa: E402
from xenctl.nodes import scale_nodes  # noqa: E402
from xenctl.pool import pool_create  # noqa: E402
from xenctl.session import CallStats, connect  # noqa: E402
from xenctl.spec import GiB, Secret, load_spec  # noqa: E402

POLLING = ("task.get_status", "task.get_record", "task.get_progress", "VM.get_guest_metrics",
           "VM_guest_metrics.get_networks", "VM_guest_metrics.get_record", "VM.get_power_state")


def run(sim: SimServer, nodes: int, concurrency: int, label: str) -> dict[str, Any]:
    hosts = [f"{h.address}:{sim.port}" for h in sim.hosts]
    spec = load_spec(None, env={}, overrides={
        "pool.master": hosts[0], "pool.members": hosts[1:], "pool.tls.ca_file": sim.ca_file,
        "nodes.template": "CentOS 7 (medstream node)", "nodes.network": "xenbr0",
        "nodes.cidr": "10.213.128.0/17", "nodes.concurrency": concurrency,
        "nodes.ip_timeout": 300, "nodes.shutdown_timeout": 30})
    pw = Secret(sim.password)
    marks: dict[str, dict[str, float]] = {}
    lock = threading.Lock()

    def progress(name: str, what: str) -> None:
        now = time.monotonic()
        with lock:
            m = marks.setdefault(name, {})
            if what == "cloning":
                m.setdefault("start", now)
            elif what.startswith("up at"):
                m["up"] = now
        print(f"  [{label}] {name}: {what}", file=sys.stderr, flush=True)

    stats = CallStats()
    x = connect(spec.pool, pw, stats=stats)
    try:
        t0 = time.monotonic()
        res = scale_nodes(x, spec, nodes, progress=progress)
        wall = time.monotonic() - t0
    finally:
        x.logout()
    if res.failures:
        raise SystemExit(f"{label}: {len(res.failures)} node(s) failed: {res.failures[0].error}")
    paths = [m["up"] - m["start"] for m in marks.values() if "up" in m and "start" in m]
    counts = stats.snapshot()
    total = sum(counts.values())
    # tear down (not timed) so the next run starts from 0
    x = connect(spec.pool, pw)
    try:
        scale_nodes(x, spec, 0)
    finally:
        x.logout()
    return {
        "label": label, "nodes": nodes, "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "node_critical_path_s": {"min": round(min(paths), 2), "max": round(max(paths), 2),
                                 "mean": round(sum(paths) / len(paths), 2)},
        "xenapi_calls": total, "calls_per_node": round(total / nodes, 2),
        "polling_calls": sum(v for k, v in counts.items() if k in POLLING),
        "event_from_calls": counts.get("event.from", 0),
        "call_mix": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--latency-scale", type=float, default=1.0,
                    help="multiply the latency model (1 = clone 2 s, start 5 s, IP 10 s)")
    ap.add_argument("--skip-serial", action="store_true",
                    help="skip the one-at-a-time run (it takes nodes x ~17 s)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "provision"))
    args = ap.parse_args()
    latency = {"profile": "none", "scale": args.latency_scale,
               "delays": {"VM.clone": 2.0, "VM.start": 5.0, "VM.start_on": 5.0, "guest_ip": 10.0}}
    cfg = SimConfig(hosts=3, host_memory=16 * GiB, latency=latency, sync_interval=5.0)
    results: dict[str, Any] = {
        "benchmark": "xenctl scale-nodes 0 -> N on xapisim",
        "latency_model_s": {k: v * args.latency_scale for k, v in latency["delays"].items()},
        "hosts": 3, "host_memory_gib": 16, "node": "1 vCPU, 1 GiB, clone of a template with a 10 GiB disk",
        "transport": "XenAPI SDK (PyPI, unchanged) over HTTPS with CA verification",
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with SimServer(cfg) as sim:
        hosts = [f"{h.address}:{sim.port}" for h in sim.hosts]
        spec = load_spec(None, env={}, overrides={"pool.master": hosts[0], "pool.members": hosts[1:],
                                                  "pool.tls.ca_file": sim.ca_file})
        pool_create(spec.pool, Secret(sim.password))
        conc = run(sim, args.nodes, args.concurrency, f"concurrency {args.concurrency}")
        results["concurrent"] = conc
        if not args.skip_serial:
            results["one_at_a_time"] = run(sim, args.nodes, 1, "one at a time")
    slowest = (results["one_at_a_time"]["node_critical_path_s"]["max"] if "one_at_a_time" in results
               else conc["node_critical_path_s"]["max"])
    target = 1.5 * slowest * math.ceil(args.nodes / args.concurrency)
    results["targets"] = {
        "wall_s_limit": round(target, 2),
        "wall_s_limit_formula": "1.5 x slowest single node's critical path x ceil(N / concurrency)",
        "wall_ok": conc["wall_s"] < target,
        "calls_per_node_limit": 15, "calls_ok": conc["calls_per_node"] <= 15,
        "no_polling_ok": conc["polling_calls"] == 0,
    }
    if "one_at_a_time" in results:
        results["speedup"] = round(results["one_at_a_time"]["wall_s"] / conc["wall_s"], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(results))
    print(render(results))


def render(r: dict[str, Any]) -> str:
    c = r["concurrent"]
    s = r.get("one_at_a_time")
    t = r["targets"]
    lat = r["latency_model_s"]
    lines = [
        "# xenctl provisioning benchmark",
        "",
        f"{r['benchmark']}; 3 hosts x 16 GiB; latency model: clone {lat['VM.clone']} s, start "
        f"{lat['VM.start_on']} s, guest IP {lat['guest_ip']} s after start. {r['transport']}. "
        f"Run {r['date_utc']} (`bench/provision.py`).",
        "",
        "| run | nodes | concurrency | wall time | node critical path (min / mean / max) | "
        "XenAPI calls | calls per node | polling calls | event.from calls |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run_ in (c, s):
        if run_ is None:
            continue
        p = run_["node_critical_path_s"]
        lines.append(f"| {run_['label']} | {run_['nodes']} | {run_['concurrency']} | "
                     f"{run_['wall_s']} s | {p['min']} / {p['mean']} / {p['max']} s | "
                     f"{run_['xenapi_calls']} | {run_['calls_per_node']} | {run_['polling_calls']} | "
                     f"{run_['event_from_calls']} |")
    lines += [
        "",
        f"Target: wall time < {t['wall_s_limit']} s ({t['wall_s_limit_formula']}): "
        f"**{'met' if t['wall_ok'] else 'NOT met'}** ({c['wall_s']} s). "
        f"Calls per node <= 15: **{'met' if t['calls_ok'] else 'NOT met'}** ({c['calls_per_node']}). "
        f"No busy polling: **{'met' if t['no_polling_ok'] else 'NOT met'}**.",
    ]
    if "speedup" in r:
        lines.append(f"Speed-up over one VM at a time: {r['speedup']}x.")
    lines += ["", "Call mix (concurrent run):", ""]
    lines += [f"- `{k}`: {v}" for k, v in c["call_mix"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
