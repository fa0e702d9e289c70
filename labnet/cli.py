"""python -m labnet: bring a lab up by hand, list labs, clean up after crashed owners."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence

from .cleanup import cleanup_dead, list_labs
from .errors import LabError
from .lab import Lab
from .shaping import PROFILES, REGIMES


def _up(args: argparse.Namespace) -> int:
    names = ([args.workstation] if args.workstation else []) + [
        f"{args.name}-{i:02d}" for i in range(1, args.nodes + 1)]
    t0 = time.monotonic()
    with Lab.create(args.workdir) as lab:
        print(f"labnet: lab {lab.prefix} on {lab.subnet}; starting {len(names)} hosts ...",
              file=sys.stderr, flush=True)
        lab.add_hosts(names, timeout=max(30.0, len(names) * 1.0))
        if args.shape:
            if not args.workstation:
                raise LabError("--shape needs --workstation (the host whose access link is shaped)")
            lab.shape(args.workstation, args.shape, args.regime)
        print(f"labnet: up in {time.monotonic() - t0:.2f}s", file=sys.stderr)
        print(lab.describe(), flush=True)
        if args.hold <= 0:
            print("labnet: --hold 0: tearing down", file=sys.stderr)
            return 0
        print(f"labnet: holding for {args.hold:.0f}s (Ctrl-C tears down)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM = Ctrl-C
        try:
            time.sleep(args.hold)
        except KeyboardInterrupt:
            pass
        print("labnet: tearing down", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    labs = list_labs()
    if args.json:
        print(json.dumps(labs, indent=1))
        return 0
    if not labs:
        print("no labs")
    for lab in labs:
        state = "alive" if lab["alive"] else "DEAD (python -m labnet cleanup removes it)"
        print(f"{lab['prefix']}  {lab['subnet']:<16} owner {lab['owner_pid']} {state}, "
              f"{len(lab['hosts'])} hosts")
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    removed = cleanup_dead(include_alive=args.all)
    for item in removed:
        print(f"removed {item}")
    print(f"labnet cleanup: {len(removed)} objects removed")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m labnet",
        description="Lab hosts (network namespaces with their own sshd and filesystem view) on a "
                    "bridge in 10.213.0.0/16, with htb rate shaping. Needs root.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create a lab, print how to reach it, hold it, tear it down")
    up.add_argument("nodes", type=int, help="number of node hosts")
    up.add_argument("--name", default="node", help="node name stem (default: node -> node-01 ...)")
    up.add_argument("--workstation", default="", metavar="NAME",
                    help="also create a workstation host with this name")
    up.add_argument("--shape", choices=sorted(PROFILES), help="shape the workstation's access link")
    up.add_argument("--regime", choices=REGIMES, default="shared")
    up.add_argument("--hold", type=float, default=3600.0,
                    help="seconds to keep the lab up (default 3600; 0 = tear down at once)")
    up.add_argument("--workdir", default=None, help="parent of the lab directory "
                    "(default /run/medstream-labnet; must not be under /etc /srv /opt /root /var)")
    ls = sub.add_parser("list", help="list labs on this machine and whether their owner lives")
    ls.add_argument("--json", action="store_true")
    cl = sub.add_parser("cleanup", help="remove labs whose owning process is dead")
    cl.add_argument("--all", action="store_true", help="also labs whose owner is alive (careful)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            return _up(args)
        if args.cmd == "list":
            return _list(args)
        return _cleanup(args)
    except LabError as exc:
        print(f"labnet: error: {exc}", file=sys.stderr)
        return 1
