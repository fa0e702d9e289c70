"""``xenctl up`` / ``xenctl down``: the whole storage cloud from one command, in resumable phases.

Phases, in order: ``pool`` (pool create), ``nodes`` (scale-nodes), ``inventory`` (inventory/hosts.yml),
``deploy`` (``ansible-playbook playbooks/site.yml`` through :mod:`xenctl.deploy`, the Ansible part's
runner), ``smoke`` (a small generated study uploaded from the workstation and fetched back) and,
when asked for (``study_slices``), ``study``: the paper's CT series (360 slices of 640x640)
generated on the workstation and uploaded to the nodes, with the transfer report. Every phase is
idempotent, so a failed run is resumed by running ``xenctl up`` again: finished phases report no
change. ``down`` scales the fleet to zero and rewrites the inventory.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import procs
from .errors import Interrupted, XenctlError
from .inventory import build_inventory, write_inventory
from .nodes import NodeResult, scale_nodes
from .pool import pool_create
from .session import CallStats, connect
from .spec import CloudSpec, Secret

__all__ = ["PHASES", "DeployOptions", "Phase", "PhaseError", "UpResult", "down", "up"]

PHASES = ("pool", "nodes", "inventory", "deploy", "smoke", "study")
Progress = Callable[[str], None]


class PhaseError(XenctlError):
    """A phase of ``up``/``down`` failed; the message names it and how to resume."""

    def __init__(self, phase: str, cause: Exception) -> None:
        self.phase = phase
        super().__init__(f"phase {phase!r} failed: {cause}",
                         hint="fix the cause and run the same command again; finished phases "
                              "are not redone")


@dataclass
class Phase:
    name: str
    changed: bool = False
    seconds: float = 0.0
    detail: str = ""
    skipped: bool = False


@dataclass
class UpResult:
    phases: list[Phase] = field(default_factory=list)
    nodes: list[NodeResult] = field(default_factory=list)
    inventory: Path | None = None
    study: dict[str, Any] = field(default_factory=dict)  # transfer's upload report

    @property
    def changed(self) -> bool:
        return any(p.changed for p in self.phases)

    def summary(self) -> list[str]:
        lines = []
        for p in self.phases:
            state = "skipped" if p.skipped else ("changed" if p.changed else "ok")
            lines.append(f"  {p.name:<10} {state:<8} {p.seconds:7.1f}s  {p.detail}")
        return lines


@dataclass
class DeployOptions:
    """What the deploy and smoke phases need to reach the hosts (the lab provides these)."""

    ssh_config: Path | None = None
    private_key: Path | None = None
    known_hosts: Path | None = None
    extra_vars: Mapping[str, Any] = field(default_factory=dict)
    #: the deploy runner's state (PKI, token, logs); None: its default (~/.local/state/medstream).
    #: A throwaway cloud (--sim) keeps it in its own directory; the wheelhouse stays in the
    #: default cache either way (it depends only on the sources)
    state_dir: Path | None = None
    #: processes the deploy left running as xenctl's children (Ansible's ssh masters)
    adopted: set[int] = field(default_factory=set)


@contextmanager
def _phase(result: UpResult, name: str, progress: Progress) -> Iterator[Phase]:
    ph = Phase(name)
    result.phases.append(ph)
    progress(f"== {name}")
    t0 = time.monotonic()
    try:
        yield ph
    except PhaseError:
        raise
    except XenctlError as exc:
        ph.seconds = time.monotonic() - t0
        raise PhaseError(name, exc) from exc
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM turned into it by the CLI
        ph.seconds = time.monotonic() - t0
        progress(f"== {name}: interrupted after {ph.seconds:.1f}s")
        raise Interrupted(f"interrupted during phase {name!r}",
                          hint="run the same command again to resume; finished phases are "
                               "not redone") from exc
    ph.seconds = time.monotonic() - t0
    progress(f"== {name}: {'changed' if ph.changed else 'ok'} in {ph.seconds:.1f}s"
             + (f" ({ph.detail})" if ph.detail else ""))


def up(spec: CloudSpec, password: Secret, *, count: int | None = None,
       inventory_path: Path = Path("inventory/hosts.yml"), skip: Collection[str] = (),
       progress: Progress = print, node_progress: Callable[[str, str], None] | None = None,
       stats: CallStats | None = None, deploy: DeployOptions | None = None,
       study_slices: int = 0) -> UpResult:
    """Run the phases (see the module docstring); raise :class:`PhaseError` on the first failure."""
    unknown = set(skip) - set(PHASES)
    if unknown:
        raise XenctlError(f"unknown phase(s) {', '.join(sorted(unknown))}; phases: {', '.join(PHASES)}")
    result = UpResult(inventory=inventory_path)
    want = spec.nodes.count if count is None else count
    deploy = deploy or DeployOptions(private_key=spec.nodes.ssh_private_key)

    def skipped(name: str) -> bool:
        if name in skip:
            result.phases.append(Phase(name, skipped=True))
            progress(f"== {name}: skipped")
            return True
        return False

    if not skipped("pool"):
        with _phase(result, "pool", progress) as ph:
            res = pool_create(spec.pool, password, progress=progress, stats=stats)
            ph.changed, ph.detail = res.changed, f"master {res.master}, {len(spec.pool.all_hosts)} hosts"
    if not skipped("nodes"):
        with _phase(result, "nodes", progress) as ph:
            x = connect(spec.pool, password, stats=stats)
            try:
                sres = scale_nodes(x, spec, want, progress=node_progress or (
                    lambda n, w: progress(f"{n}: {w}")))
            finally:
                x.logout()
            if sres.failures:
                raise XenctlError(f"{len(sres.failures)} node(s) failed, first: "
                                  f"{sres.failures[0].name}: {sres.failures[0].error}")
            result.nodes = sres.nodes
            ph.changed = sres.changed
            ph.detail = f"{len(sres.nodes)} node(s), {sres.calls} XenAPI calls"
    if not skipped("inventory"):
        with _phase(result, "inventory", progress) as ph:
            x = connect(spec.pool, password, stats=stats)
            try:
                inv = build_inventory(x, spec)
            finally:
                x.logout()
            if len(inv["nodes"]) != want and "nodes" not in skip:
                raise XenctlError(f"inventory has {len(inv['nodes'])} node(s) with an IP, want {want}")
            ph.changed = write_inventory(inv, inventory_path)
            ph.detail = f"{inventory_path}: {len(inv['nodes'])} node(s)"
    if not skipped("deploy"):
        with _phase(result, "deploy", progress) as ph:
            ph.changed, ph.detail = _deploy(inventory_path, deploy, progress)
    if not skipped("smoke"):
        with _phase(result, "smoke", progress) as ph:
            ph.detail = _smoke(spec, deploy, progress)
    if study_slices > 0 and not skipped("study"):
        with _phase(result, "study", progress) as ph:
            result.study = _study(spec, deploy, progress, study_slices)
            t = result.study["total"]
            ph.changed = True
            ph.detail = (f"{t['files']} images, {t['bytes'] / 1e6:.0f} MB to "
                         f"{len(result.study['nodes'])} node(s) in {result.study['seconds']:.1f}s "
                         f"({t['mb_per_s']:.0f} MB/s)")
    return result


def down(spec: CloudSpec, password: Secret, *, inventory_path: Path = Path("inventory/hosts.yml"),
         progress: Progress = print, stats: CallStats | None = None) -> UpResult:
    """Remove the fleet (scale to 0) and rewrite the inventory; the pool itself stays."""
    result = UpResult(inventory=inventory_path)
    with _phase(result, "nodes", progress) as ph:
        x = connect(spec.pool, password, stats=stats)
        try:
            sres = scale_nodes(x, spec, 0, progress=lambda n, w: progress(f"{n}: {w}"))
            inv = build_inventory(x, spec)
        finally:
            x.logout()
        if sres.failures:
            raise XenctlError(f"{len(sres.failures)} node(s) could not be removed")
        ph.changed = sres.changed
        ph.detail = f"{len(sres.plan.of('remove'))} node(s) removed"
    with _phase(result, "inventory", progress) as ph:
        ph.changed = write_inventory(inv, inventory_path)
    return result


def _deploy(inventory: Path, opts: DeployOptions, progress: Progress) -> tuple[bool, str]:
    """Hand over to the Ansible part's runner (docs/INTERFACES.md, "xenctl.deploy")."""
    try:
        mod = importlib.import_module("xenctl.deploy")
    except ImportError as exc:
        raise XenctlError("the deploy step is not available (xenctl.deploy is missing)",
                          hint="skip it with --skip deploy,smoke") from exc
    run = getattr(mod, "run_site", None)
    if run is None:
        raise XenctlError("xenctl.deploy has no run_site() (see docs/INTERFACES.md)")
    kw: dict[str, Any] = {}
    if opts.state_dir is not None:
        kw["state_dir"] = opts.state_dir
        kw["wheelhouse"] = mod.build_wheelhouse(mod.default_state_dir() / "wheelhouse",
                                                progress=progress)
    # ansible-playbook's workers and ssh processes run in sessions of their own, and when
    # interrupted the runner kills ansible-playbook alone: adopt the orphans while it runs
    # (see xenctl.procs) and end them on the way out; ssh masters that outlive a successful run
    # are remembered in opts.adopted for the caller (--sim ends them at teardown)
    keep = procs.children()
    adopting = procs.set_subreaper(True)
    try:
        res = run(inventory, ssh_config=opts.ssh_config, private_key=opts.private_key,
                  extra_vars=dict(opts.extra_vars), progress=progress, **kw)
    except BaseException as exc:
        if adopting:
            procs.end_children(keep)
        if opts.state_dir is not None and isinstance(exc, Exception):
            _show_log_tail(opts.state_dir, progress)
        raise
    finally:
        if adopting:
            procs.set_subreaper(False)
    opts.adopted |= procs.children() - keep
    changed = bool(getattr(res, "changed", True))
    return changed, str(getattr(res, "summary", ""))


def _show_log_tail(state_dir: Path, progress: Progress, lines: int = 40) -> None:
    """A throwaway cloud's deploy log goes with it: show its end before it does."""
    logs = sorted((state_dir / "logs").glob("site-*.log"))
    if not logs:
        return
    try:
        tail = logs[-1].read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return
    progress(f"last {len(tail)} lines of the deploy log (it is removed with the simulated pool):")
    for line in tail:
        progress(f"  | {line}")


SMOKE_SCRIPT = r"""
set -eu
d=$(mktemp -d /tmp/medstream-smoke.XXXXXX)
trap 'rm -rf "$d"' EXIT
transfer synth "$d/in" --slices {slices} --rows 64 --cols 64 --seed "$$" >/dev/null
transfer upload "$d/in" --no-progress >/dev/null
py=$(dirname "$(readlink -f "$(command -v transfer)")")/python
study=$("$py" -c 'import glob, sys, pydicom
f = sorted(glob.glob(sys.argv[1] + "/**/*", recursive=True))
print(next(pydicom.dcmread(p).StudyInstanceUID for p in f if p.endswith(".dcm")))' "$d/in")
transfer get "$d/out" --study "$study" >/dev/null
(cd "$d/in" && find . -type f -name '*.dcm' -exec sha256sum {{}} + | cut -d' ' -f1 | sort) > "$d/a"
(cd "$d/out" && find . -type f -name '*.dcm' -exec sha256sum {{}} + | cut -d' ' -f1 | sort) > "$d/b"
n=$(wc -l < "$d/a")
if cmp -s "$d/a" "$d/b" && [ "$n" -eq {slices} ]; then echo "SMOKE-OK $n"; else
  echo "SMOKE-MISMATCH sent $n, got $(wc -l < "$d/b")"; exit 3; fi
"""


def _ssh(spec: CloudSpec, opts: DeployOptions) -> list[str]:
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
    if opts.ssh_config:
        ssh += ["-F", str(opts.ssh_config)]
    key = opts.private_key or spec.workstation.ssh_private_key
    if key:
        ssh += ["-i", str(key)]
    if opts.known_hosts:
        ssh += ["-o", f"UserKnownHostsFile={opts.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    return [*ssh, f"{spec.workstation.ssh_user}@{spec.workstation.address}"]


def _on_workstation(spec: CloudSpec, opts: DeployOptions, script: str, what: str,
                    timeout: float) -> subprocess.CompletedProcess[str]:
    if not spec.workstation.address:
        raise XenctlError("no workstation in the spec (workstation.address)")
    try:
        return subprocess.run([*_ssh(spec, opts), "sh", "-s"], input=script, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise XenctlError(f"{what} could not run: {exc}") from exc


STUDY_SCRIPT = r"""
set -eu
d=$(mktemp -d /tmp/medstream-study.XXXXXX)
trap 'rm -rf "$d"' EXIT
transfer synth "$d/in" --slices {slices} --seed "$$" >/dev/null
transfer upload "$d/in" --no-progress --json-report "$d/report.json" >/dev/null
cat "$d/report.json"
"""


def _study(spec: CloudSpec, opts: DeployOptions, progress: Progress, slices: int) -> dict[str, Any]:
    """The paper's job: a CT series generated on the workstation, uploaded to every node."""
    progress(f"study: {slices} CT slices (640x640) from the workstation to the nodes")
    out = _on_workstation(spec, opts, STUDY_SCRIPT.format(slices=slices), "the study upload", 1800)
    if out.returncode != 0:
        raise XenctlError(f"study upload failed (exit {out.returncode}): "
                          f"{(out.stdout + out.stderr).strip()[-400:]}")
    try:
        report: dict[str, Any] = json.loads(out.stdout)
    except ValueError as exc:
        raise XenctlError(f"study upload: unreadable report: {out.stdout[-200:]!r}") from exc
    if not report.get("ok"):
        raise XenctlError(f"study upload: {report.get('total')}")
    return report


def _smoke(spec: CloudSpec, opts: DeployOptions, progress: Progress, slices: int = 8) -> str:
    """From the workstation: generate a small study, upload it to the nodes, fetch it back by
    its Study Instance UID and compare every file's bytes (SHA-256)."""
    progress(f"smoke: {slices} images from {spec.workstation.address} to the nodes and back")
    out = _on_workstation(spec, opts, SMOKE_SCRIPT.format(slices=slices), "the smoke test", 600)
    if out.returncode != 0 or "SMOKE-OK" not in out.stdout:
        detail = (out.stdout + out.stderr).strip()[-400:]
        raise XenctlError(f"smoke test failed (exit {out.returncode}): {detail}")
    return f"{slices} images uploaded from the workstation and fetched back byte-identical"
