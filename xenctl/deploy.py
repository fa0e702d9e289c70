"""The Ansible runner: build the wheelhouse, run ``playbooks/site.yml``, report what happened.

``xenctl up`` calls :func:`run_site` for its deploy phase (docs/INTERFACES.md). It

1. builds (or reuses) a *wheelhouse* on the controller: a wheel of this checkout plus the wheels of
   every runtime dependency, in a directory named after a hash of the sources and the dependency
   list, so the nodes install with ``pip --no-index`` and need no internet;
2. runs ``ansible-playbook playbooks/site.yml -i INVENTORY`` with ``ANSIBLE_CONFIG`` pointing at the
   repository's ``ansible.cfg`` (secrets never on argv: the token lives in a 0600 file in the state
   directory, or in an Ansible Vault file the caller names);
3. streams one progress line per task and per failed host, parses the ``PLAY RECAP`` and raises
   :class:`DeployError` naming the failed host and task when the play fails.

``python -m xenctl.deploy wheelhouse --out DIR`` builds the wheelhouse alone and prints its path
(``playbooks/site.yml`` runs it on the controller when no wheelhouse was passed in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import XenctlError

__all__ = [
    "DeployError",
    "DeployResult",
    "HostRecap",
    "Wheelhouse",
    "build_wheelhouse",
    "default_state_dir",
    "find_ansible_playbook",
    "parse_recap",
    "repo_root",
    "run_site",
]

Progress = Callable[[str], None]

#: what goes into the medstream wheel (mirrors pyproject's packages.find and package-data)
PACKAGES = ("transfer", "xenctl", "xapisim", "labnet")
PACKAGE_SUFFIXES = (".py", ".json", ".md", ".txt", ".toml", ".yml")
BUILD_FILES = ("pyproject.toml", "README.md")
#: kept in the deps directory so the medstream wheel builds offline (pip's build isolation);
#: pip's own wheel also goes to the nodes, which run it straight from the wheel file
BUILD_REQUIRES = ("setuptools>=68", "wheel", "pip")
BUILD_ONLY = {"setuptools", "wheel"}


class DeployError(XenctlError):
    """The playbook (or the wheelhouse build before it) failed.

    ``host`` and ``task`` name the first failure Ansible reported; ``failed_hosts`` lists every
    host that failed or was unreachable.
    """

    def __init__(self, message: str, *, hint: str = "", host: str = "", task: str = "",
                 failed_hosts: Iterable[str] = ()) -> None:
        super().__init__(message, hint=hint)
        self.host = host
        self.task = task
        self.failed_hosts = list(failed_hosts)


@dataclass(frozen=True)
class HostRecap:
    """One line of Ansible's ``PLAY RECAP``."""

    host: str
    ok: int = 0
    changed: int = 0
    unreachable: int = 0
    failed: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0


@dataclass
class DeployResult:
    """What :func:`run_site` reports: ``changed`` is true when any host had a change."""

    recap: dict[str, HostRecap] = field(default_factory=dict)
    seconds: float = 0.0
    wheelhouse: Path | None = None
    log: Path | None = None
    #: wall time of every task and handler, in order (name, seconds)
    task_seconds: list[tuple[str, float]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.recap.values())

    @property
    def summary(self) -> str:
        ch = sum(r.changed for r in self.recap.values())
        return (f"{len(self.recap)} host(s), {ch} change(s), "
                f"{sum(r.ok for r in self.recap.values())} ok task(s) in {self.seconds:.1f}s")


@dataclass(frozen=True)
class Wheelhouse:
    """A directory of wheels that installs medstream with ``pip install --no-index``."""

    path: Path
    build_id: str
    built: bool  # False when an existing wheelhouse was reused

    @property
    def archive(self) -> Path:
        """``<path>.tar``: the same wheels in one deterministic file (one copy per node)."""
        return self.path.with_name(self.path.name + ".tar")


def repo_root() -> Path:
    """The checkout this module lives in (holds ``ansible.cfg`` and ``playbooks/``)."""
    return Path(__file__).resolve().parent.parent


def default_state_dir() -> Path:
    """Where the controller keeps the PKI, token and wheelhouses (outside the repository).

    ``$MEDSTREAM_STATE_DIR``, else ``$XDG_STATE_HOME/medstream``, else ``~/.local/state/medstream``.
    """
    env = os.environ.get("MEDSTREAM_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "medstream"


# --------------------------------------------------------------------------- wheelhouse

def _source_files(src: Path) -> list[Path]:
    files = [src / f for f in BUILD_FILES if (src / f).is_file()]
    for pkg in PACKAGES:
        root = src / pkg
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if "__pycache__" in p.parts or not p.is_file() or p.suffix not in PACKAGE_SUFFIXES:
                continue
            files.append(p)
    return files


def _dependencies(src: Path) -> list[str]:
    try:
        data = tomllib.loads((src / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DeployError(f"cannot read {src / 'pyproject.toml'}: {exc}") from exc
    deps = data.get("project", {}).get("dependencies", [])
    return sorted(str(d) for d in deps)


def _python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}-{sys.platform}-{os.uname().machine}"


def _hash_files(files: Iterable[Path], base: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(base)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _run_pip(args: list[str], what: str, progress: Progress) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeployError(f"wheelhouse: {what} could not run: {exc}") from exc
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise DeployError(f"wheelhouse: {what} failed (pip exit {out.returncode}): "
                          + " | ".join(tail),
                          hint="the controller needs PyPI (or a pip index) to fetch dependencies once")


def build_wheelhouse(out: Path | None = None, *, src: Path | None = None,
                     progress: Progress | None = None) -> Wheelhouse:
    """Build a wheelhouse for ``src`` (default: this checkout) under ``out`` (default: state dir).

    Dependencies are built once per dependency list and Python (``out/deps-<hash>``); the
    medstream wheel once per source hash. The result is ``out/<build_id>/``, where ``build_id``
    covers both; an existing complete directory is reused as is.
    """
    say = progress or (lambda _m: None)
    src = (src or repo_root()).resolve()
    out = (out or default_state_dir() / "wheelhouse").resolve()
    files = _source_files(src)
    if not files:
        raise DeployError(f"{src} holds no medstream sources")
    deps = _dependencies(src)
    dep_id = hashlib.sha256(json.dumps([deps, BUILD_REQUIRES, _python_tag()]).encode()).hexdigest()[:16]
    build_id = hashlib.sha256(
        f"{dep_id}:{_hash_files(files, src)}".encode()).hexdigest()[:16]
    final = out / build_id
    if (final / ".complete").is_file():
        wh = Wheelhouse(final, build_id, built=False)
        if not wh.archive.is_file():
            _write_archive(final, wh.archive)
        return wh
    out.mkdir(parents=True, exist_ok=True)
    dep_dir = out / f"deps-{dep_id}"
    if not (dep_dir / ".complete").is_file():
        say(f"wheelhouse: fetching {len(deps)} runtime dependencies (once per dependency list)")
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".deps-"))
        try:
            _run_pip(["wheel", "--wheel-dir", str(tmp), *deps, *BUILD_REQUIRES],
                     "pip wheel (dependencies)", say)
            (tmp / ".complete").write_text("\n".join(deps) + "\n")
            tmp.chmod(0o755)
            shutil.rmtree(dep_dir, ignore_errors=True)
            os.replace(tmp, dep_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"wheelhouse: building medstream {build_id} from {src}")
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".build-"))
    try:
        tree = tmp / "src"
        for f in files:  # build from a copy: the wheel holds exactly what was hashed
            dest = tree / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        wheels = tmp / "wheels"
        wheels.mkdir()
        _run_pip(["wheel", "--no-deps", "--no-index", "--find-links", str(dep_dir),
                  "--wheel-dir", str(wheels), str(tree)], "pip wheel (medstream)", say)
        for w in dep_dir.glob("*.whl"):
            if w.name.split("-")[0].lower() not in BUILD_ONLY and not (wheels / w.name).exists():
                os.link(w, wheels / w.name)
        (wheels / ".complete").write_text(build_id + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(wheels, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wh = Wheelhouse(final, build_id, built=True)
    _write_archive(final, wh.archive)
    return wh


def _write_archive(src: Path, dest: Path) -> None:
    """A tar of ``src``'s wheels with fixed owners, modes and times (same bytes every time)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(src.iterdir()):
            if not f.is_file() or f.name.startswith("."):
                continue
            info = tarfile.TarInfo(f.name)
            info.size = f.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with f.open("rb") as fp:
                tar.addfile(info, fp)
    os.replace(tmp, dest)


# --------------------------------------------------------------------------- the playbook

_RECAP_RE = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)(?:\s+skipped=(?P<skipped>\d+))?(?:\s+rescued=(?P<rescued>\d+))?"
    r"(?:\s+ignored=(?P<ignored>\d+))?")
_TASK_RE = re.compile(r"^(TASK|RUNNING HANDLER) \[(?P<name>.*)\] \**$")
_PLAY_RE = re.compile(r"^PLAY \[(?P<name>.*)\] \**$")
_FAIL_RE = re.compile(r"^(?:fatal|failed): \[(?P<host>[^\]]+)\](?:: (?P<kind>[A-Z]+)!)?(?P<rest>.*)$")


def parse_recap(lines: Iterable[str]) -> dict[str, HostRecap]:
    """The ``PLAY RECAP`` lines of an ``ansible-playbook`` run, by host."""
    out: dict[str, HostRecap] = {}
    for line in lines:
        m = _RECAP_RE.match(line.strip())
        if m:
            vals = {k: int(v) for k, v in m.groupdict().items() if k != "host" and v is not None}
            out[m.group("host")] = HostRecap(m.group("host"), **vals)
    return out


def _failure_message(rest: str) -> str:
    """The ``msg`` of Ansible's ``=> {...}`` failure JSON, else the raw text, shortened."""
    text = rest.strip()
    if "=> " in text:
        text = text.split("=> ", 1)[1]
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(data, dict):
        parts = [str(data.get("msg", "")).strip()]
        for key in ("stderr", "stdout"):
            val = str(data.get(key, "")).strip()
            if val:
                parts.append(val.splitlines()[-1])
                break
        return " | ".join(p for p in parts if p)[:300]
    return text[:300]


def run_site(inventory: Path, *, ssh_config: Path | None = None, private_key: Path | None = None,
             extra_vars: Mapping[str, Any] | None = None,
             progress: Progress | None = None, state_dir: Path | None = None,
             vault_password_file: Path | None = None, limit: str | None = None,
             playbook: Path | None = None, wheelhouse: Wheelhouse | None = None,
             vars_files: Sequence[Path] = (), ansible_playbook_path: Path | None = None,
             timeout: float = 1800.0) -> DeployResult:
    """Deploy the cloud: ``ansible-playbook playbooks/site.yml -i inventory``.

    ``ssh_config`` is passed to ssh as ``-F`` (lab hosts); ``private_key`` as Ansible's
    ``--private-key``. ``extra_vars`` go through a 0600 JSON file (never argv); ``vars_files`` are
    passed as ``-e @FILE`` after them (e.g. an Ansible Vault file holding ``medstream_token``,
    opened with ``vault_password_file``). The token, PKI and wheelhouse live in ``state_dir``
    (default :func:`default_state_dir`). ``ansible_playbook_path`` overrides
    :func:`find_ansible_playbook`. Raises :class:`DeployError` naming the first failed (or
    unreachable) host and task.
    """
    say = progress or (lambda _m: None)
    t0 = time.monotonic()
    root = repo_root()
    inventory = Path(inventory).resolve()
    if not inventory.exists():
        raise DeployError(f"inventory {inventory} does not exist",
                          hint="run `xenctl inventory --write` (or `xenctl up`) first")
    for vf in vars_files:
        if not Path(vf).is_file():
            raise DeployError(f"variables file {vf} does not exist")
    ansible_playbook = find_ansible_playbook(ansible_playbook_path)  # before any slow work
    state = (state_dir or default_state_dir()).resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    wh = wheelhouse or build_wheelhouse(state / "wheelhouse", progress=say)
    say(f"deploy: wheelhouse {wh.path} ({'built' if wh.built else 'reused'})")
    variables: dict[str, Any] = {
        "medstream_state_dir": str(state),
        "medstream_wheelhouse": str(wh.path),
        "medstream_build_id": wh.build_id,
    }
    variables.update(extra_vars or {})
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": str(root / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_STDOUT_CALLBACK": "default",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    })
    if ssh_config:
        env["ANSIBLE_SSH_COMMON_ARGS"] = f"-F {Path(ssh_config).resolve()}"
    # Ansible's controller temp dir (its module cache) is private to this run and removed after
    # it: Ansible removes its own only when it exits normally, not when a timeout or Ctrl-C ends
    # it (each such run left an ansible-local-* directory in ~/.ansible/tmp). A module run on the
    # controller (connection: local) unpacks its payload under TMPDIR and removes it in a
    # `finally` that a signal skips, so TMPDIR for this run points into the same private dir.
    tmp_base = Path(os.path.expanduser(os.environ.get("ANSIBLE_LOCAL_TEMP") or
                                       str(state / "ansible-tmp")))
    tmp_base.mkdir(parents=True, exist_ok=True, mode=0o700)
    local_tmp = Path(tempfile.mkdtemp(dir=tmp_base, prefix="run-"))
    env["ANSIBLE_LOCAL_TEMP"] = str(local_tmp)
    env["TMPDIR"] = str(local_tmp)
    log_path = state / "logs" / f"site-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd, vars_file = tempfile.mkstemp(dir=state, prefix=".extra-vars-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp: mode 0600
            json.dump(variables, f)
        cmd = [str(ansible_playbook), str(playbook or root / "playbooks" / "site.yml"),
               "-i", str(inventory), "-e", f"@{vars_file}"]
        for vf in vars_files:
            cmd += ["-e", f"@{Path(vf).resolve()}"]
        if private_key:
            cmd += ["--private-key", str(Path(private_key).resolve())]
        if vault_password_file:
            cmd += ["--vault-password-file", str(Path(vault_password_file).resolve())]
        if limit:  # the controller play must run too: it provides the wheelhouse facts
            cmd += ["--limit", f"localhost,{limit}"]
        run = _stream(cmd, env=env, cwd=root, log_path=log_path, say=say, timeout=timeout)
    finally:
        os.unlink(vars_file)
        shutil.rmtree(local_tmp, ignore_errors=True)
    return _result(run, t0=t0, wheelhouse=wh.path, log_path=log_path)


def find_ansible_playbook(explicit: Path | None = None) -> Path:
    """The ``ansible-playbook`` to run.

    ``explicit``, else ``$MEDSTREAM_ANSIBLE_PLAYBOOK``, else the one next to this Python (the
    venv's), else the first on ``PATH``. Raises :class:`DeployError` when none is executable.
    """
    hint = ("install ansible-core on the controller: pip install 'medstream[deploy]' "
            "(or set MEDSTREAM_ANSIBLE_PLAYBOOK to its path)")
    chosen = explicit or os.environ.get("MEDSTREAM_ANSIBLE_PLAYBOOK")
    if chosen:
        path = Path(chosen)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DeployError(f"ansible-playbook not found at {path}", hint=hint)
        return path
    sibling = Path(sys.executable).with_name("ansible-playbook")
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return sibling
    found = shutil.which("ansible-playbook")
    if not found:
        raise DeployError(f"ansible-playbook not found (not next to {sys.executable}, "
                          "not on PATH)", hint=hint)
    return Path(found)


@dataclass
class _Run:
    rc: int
    lines: list[str]
    task_seconds: list[tuple[str, float]]


def _stream(cmd: list[str], *, env: Mapping[str, str], cwd: Path, log_path: Path, say: Progress,
            timeout: float) -> _Run:
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    timings: list[tuple[str, float]] = []
    task = play = ""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
    except OSError as exc:
        raise DeployError(f"cannot start ansible-playbook: {exc}") from exc
    assert proc.stdout is not None
    # a silent hang (no output) must end too: the watchdog ends ansible's whole process group,
    # which closes the pipe and ends the loop below
    expired = threading.Event()

    def watchdog() -> None:
        expired.set()
        _kill_group(proc)
    timer = threading.Timer(timeout, watchdog)
    timer.daemon = True
    timer.start()
    try:
        with log_path.open("w", encoding="utf-8") as log:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                log.write(raw)
                lines.append(line)
                if expired.is_set() or time.monotonic() > deadline:
                    break
                if (m := _PLAY_RE.match(line)) or line.startswith("PLAY RECAP"):
                    if task:
                        timings.append((task, time.monotonic() - started))
                        task = ""
                    if m:
                        play = m.group("name")
                        say(f"deploy: play {play}")
                elif m := _TASK_RE.match(line):
                    now = time.monotonic()
                    if task:
                        timings.append((task, now - started))
                    task, started = m.group("name"), now
                    say(f"deploy: {task}")
                elif m := _FAIL_RE.match(line):
                    what = "UNREACHABLE" if m.group("kind") == "UNREACHABLE" else "FAILED"
                    say(f"deploy: {what} {m.group('host')}: {_failure_message(m.group('rest'))}")
        if expired.is_set() or time.monotonic() > deadline:
            raise DeployError(f"ansible-playbook ran longer than {timeout:.0f}s "
                              f"(last task: {task or '?'})", task=task,
                              hint=f"full log: {log_path}")
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        timer.cancel()
        proc.stdout.close()
    return _Run(rc, lines, timings)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """End ansible-playbook and its workers (its own session: start_new_session), then reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:  # reaped: its pid (= the group id) may be reused
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _result(run: _Run, *, t0: float, wheelhouse: Path, log_path: Path) -> DeployResult:
    rc, lines = run.rc, run.lines
    recap = parse_recap(lines[_recap_start(lines):])
    res = DeployResult(recap=recap, seconds=time.monotonic() - t0, wheelhouse=wheelhouse,
                       log=log_path, task_seconds=run.task_seconds)
    bad = [h for h, r in recap.items() if r.failed or r.unreachable]
    if rc == 0 and not bad:
        return res
    host, task, msg, unreachable = _first_failure(lines)
    at = f" at task {task!r}" if task else ""
    others = [h for h in bad if h != host]
    more = f" (also failed: {', '.join(others)})" if others else ""
    if unreachable:
        raise DeployError(
            f"host {host} is unreachable over SSH{at}: {msg or f'exit {rc}'}{more}",
            hint=(f"check its ansible_host, ansible_port, ansible_user and key in the inventory "
                  f"and that sshd runs there; full log: {log_path}"),
            host=host, task=task, failed_hosts=bad or [host])
    where = f" on {host}" if host else ""
    raise DeployError(
        f"ansible-playbook failed{where}{at}: {msg or f'exit {rc}'}{more}",
        hint=f"full log: {log_path}; fix the cause and run again (the play is idempotent)",
        host=host, task=task, failed_hosts=bad or ([host] if host else []))


def _recap_start(lines: list[str]) -> int:
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("PLAY RECAP"):
            return i
    return len(lines)


def _first_failure(lines: list[str]) -> tuple[str, str, str, bool]:
    """(host, task, message, unreachable) of the first failure in ansible's output."""
    task = ""
    for line in lines:
        if m := _TASK_RE.match(line):
            task = m.group("name")
        elif (m := _FAIL_RE.match(line)) and "...ignoring" not in line:
            return (m.group("host"), task, _failure_message(m.group("rest")),
                    m.group("kind") == "UNREACHABLE")
    for line in reversed(lines):  # e.g. a syntax error: ansible prints ERROR! and stops
        if line.startswith(("ERROR!", "[ERROR]")):
            return "", "", line.strip()[:300], False
    return "", "", "", False


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    """``python -m xenctl.deploy wheelhouse|site``: the runner without the rest of xenctl."""
    ap = argparse.ArgumentParser(
        prog="python -m xenctl.deploy",
        description="Build the medstream wheelhouse or run playbooks/site.yml. Exit codes: "
                    "0 nothing changed, 2 changed, 1 error (one line naming the failed host and task).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheelhouse", help="build (or reuse) the wheelhouse; print its path")
    w.add_argument("--out", type=Path, default=None,
                   help="parent directory (default: $MEDSTREAM_STATE_DIR/wheelhouse)")
    w.add_argument("--src", type=Path, default=None, help="checkout to build (default: this one)")
    w.add_argument("--json", action="store_true", help="print {path, build_id, built} as JSON")
    s = sub.add_parser("site", help="run playbooks/site.yml against an inventory")
    s.add_argument("inventory", type=Path, help="inventory file (e.g. inventory/hosts.yml)")
    s.add_argument("--ssh-config", type=Path, default=None, help="ssh_config passed to ssh -F")
    s.add_argument("--private-key", type=Path, default=None, help="SSH key for every host")
    s.add_argument("--state-dir", type=Path, default=None,
                   help="PKI, token, wheelhouses and logs (default: $MEDSTREAM_STATE_DIR, "
                        "else ~/.local/state/medstream)")
    s.add_argument("--vault-password-file", type=Path, default=None,
                   help="opens Vault-encrypted values (e.g. medstream_token)")
    s.add_argument("-e", "--vars-file", type=Path, action="append", default=[],
                   help="a YAML/JSON variables file (may be Vault-encrypted); repeatable")
    s.add_argument("--limit", default=None, help="only these hosts (the controller play always runs)")
    args = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
    try:
        if args.cmd == "wheelhouse":
            wh = build_wheelhouse(args.out, src=args.src, progress=say)
            if args.json:
                print(json.dumps({"path": str(wh.path), "build_id": wh.build_id,
                                  "built": wh.built}))
            else:
                print(wh.path)
            return 0
        res = run_site(args.inventory, ssh_config=args.ssh_config, private_key=args.private_key,
                       state_dir=args.state_dir, vault_password_file=args.vault_password_file,
                       limit=args.limit, vars_files=args.vars_file, progress=say)
        print(res.summary)
        return 2 if res.changed else 0
    except XenctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
