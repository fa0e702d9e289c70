"""Measure the simulator's own speed and write the figures to a JSON file (never a test assertion).

    python -m xapisim.measure --out xapisim-figures.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from .server import SimConfig, SimServer


def _per_call(fn: Any, n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000.0


def measure(vms: int = 30) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "vms": vms}
    t = time.perf_counter()
    sim = SimServer(SimConfig(hosts=3, sync_interval=0, host_memory=16 * 1024**3)).start()
    out["start_3_hosts_ms"] = (time.perf_counter() - t) * 1000.0
    try:
        t = time.perf_counter()
        for h in sim.hosts[1:]:
            sim.session(h.name).xenapi.pool.join(sim.hosts[0].address, sim.username, sim.password)
        out["join_2_hosts_ms"] = (time.perf_counter() - t) * 1000.0
        x = sim.session("host-1").xenapi
        out["host_get_all_median_ms"] = _per_call(x.host.get_all, 200)
        tmpl = x.VM.get_by_name_label("CentOS 7 (medstream node)")[0]
        t = time.perf_counter()
        refs = []
        for i in range(vms):
            vm = x.VM.clone(tmpl, f"m{i}")
            x.VM.provision(vm)
            x.VM.start(vm, False, False)
            refs.append(vm)
        out["clone_provision_start_per_vm_ms"] = (time.perf_counter() - t) * 1000.0 / vms
        out["vm_get_all_records_median_ms"] = _per_call(x.VM.get_all_records, 20)
        token = getattr(x.event, "from")(["vm"], "", 0.0)["token"]
        other = sim.session("host-1").xenapi
        fired = threading.Event()

        def stop_one() -> None:
            fired.set()
            other.VM.hard_shutdown(refs[0])
        timer = threading.Timer(0.2, stop_one)
        timer.start()
        t = time.perf_counter()
        getattr(x.event, "from")(["vm"], token, 10.0)
        out["event_from_wake_after_change_ms"] = (time.perf_counter() - t - 0.2) * 1000.0
        timer.join()
        t = time.perf_counter()
        x.pool.sync_database()
        out["sync_database_ms"] = (time.perf_counter() - t) * 1000.0
    finally:
        sim.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="xapisim-figures.json", help="JSON file to write")
    p.add_argument("--vms", type=int, default=30)
    args = p.parse_args()
    figures = measure(args.vms)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
