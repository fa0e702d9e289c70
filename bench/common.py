"""Shared pieces of the benchmark scripts: timed child processes, the competitors' servers
(vsftpd, dcmtk storescp) and medstream's own daemons, started with their own configs and ended
by PID, and small statistics helpers.

Everything here runs either on loopback (bench/loopback.py) or inside lab hosts of
:mod:`labnet` (bench/table4.py): a ``Spawner`` is the function that starts a process, so the
same server classes work in both places.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: transferd, transfer
PY = sys.executable
GNU_TIME = "/usr/bin/time"

Spawner = Callable[..., "subprocess.Popen[Any]"]


class BenchError(RuntimeError):
    """A benchmark could not run (missing tool, server did not start, transfer failed)."""


def local_popen(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                **kwargs: Any) -> subprocess.Popen[Any]:
    full = {**os.environ, **(env or {})}
    return subprocess.Popen(list(argv), env=full, **kwargs)


def need_tool(name: str) -> str:
    """Absolute path of a program (the venv's bin first), or a clear error."""
    cand = BIN / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                    else None)
    if not found:
        raise BenchError(f"{name} not found: run ./scripts/bootstrap (installs vsftpd and dcmtk)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 15.0,
              proc: subprocess.Popen[Any] | None = None,
              connect: Callable[[str, int], bool] | None = None) -> None:
    """Wait until something accepts TCP connections on host:port (bounded)."""
    deadline = time.monotonic() + timeout
    probe = connect or _can_connect
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"server exited with code {proc.returncode} before listening on "
                             f"{host}:{port}")
        if probe(host, port):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def _can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 5.0) -> None:
    """End a process we started, by PID: SIGTERM, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=timeout)


def stop_group(proc: subprocess.Popen[Any] | None) -> None:
    """End a server and the children it forked into its session (storescp --fork)."""
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    stop(proc)


def start_server(spawn: Spawner, argv: Sequence[str], log: Path, host: str,
                 ports: Sequence[int], *, env: Mapping[str, str] | None = None,
                 group: bool = False) -> subprocess.Popen[Any]:
    """Spawn a server in its own session (output appended to ``log``) and wait until it listens
    on every port. If the wait fails or is interrupted (Ctrl-C, SIGTERM), the server is stopped
    before the error goes on: its caller never got the handle, so nothing else would stop it."""
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = spawn(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=out,
                     stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()
    try:
        for port in ports:
            wait_port(host, port, proc=proc)
    except BaseException:
        (stop_group if group else stop)(proc)
        raise
    return proc


@dataclass
class Timed:
    """One timed child process: wall seconds, exit code, peak RSS (KiB, from wait4), output."""

    seconds: float
    returncode: int
    maxrss_kb: int
    stdout: str
    stderr: str


def run_timed(argv: Sequence[str], *, spawn: Spawner = local_popen,
              env: Mapping[str, str] | None = None, timeout: float = 1800.0,
              cwd: str | Path | None = None) -> Timed:
    """Run a command to completion; time it from spawn to exit and read its peak RSS (GNU
    time's %M where installed, else the child's own ru_maxrss from wait4)."""
    rss_file: Path | None = None
    if Path(GNU_TIME).exists():
        # A child forked from this (large) Python process starts with its memory counted in
        # ru_maxrss; GNU time forks the command from its own small process instead.
        fd, name = tempfile.mkstemp(prefix="medstream-bench-rss-")
        os.close(fd)
        rss_file = Path(name)
        argv = [GNU_TIME, "-q", "-f", "%M", "-o", name, *argv]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    started = time.perf_counter()
    proc = spawn(argv, env=env, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                 cwd=str(cwd) if cwd else None, start_new_session=True)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as f:
            while True:
                b = f.read(65536)
                if not b:
                    return
                chunks[fd].append(b)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in chunks]
    for t in readers:
        t.start()
    result: dict[str, Any] = {}

    def reap() -> None:
        _, status, ru = os.wait4(proc.pid, 0)
        result["end"] = time.perf_counter()
        result["status"] = status
        result["rss"] = ru.ru_maxrss

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        waiter.join(10)
        if rss_file is not None:
            rss_file.unlink(missing_ok=True)

    waiter = threading.Thread(target=reap, daemon=True)
    waiter.start()
    try:
        waiter.join(timeout)
    except BaseException:  # Ctrl-C or SIGTERM: the client must not outlive the harness
        kill()
        raise
    if waiter.is_alive():
        kill()
        raise BenchError(f"{Path(argv[0]).name} did not finish within {timeout:.0f}s")
    proc.returncode = os.waitstatus_to_exitcode(result["status"])
    for t in readers:
        t.join(10)
    maxrss = int(result["rss"])
    if rss_file is not None:
        text = rss_file.read_text().strip().splitlines()
        rss_file.unlink(missing_ok=True)
        if text and text[-1].isdigit():
            maxrss = int(text[-1])
    return Timed(
        seconds=result["end"] - started,
        returncode=proc.returncode,
        maxrss_kb=maxrss,
        stdout=b"".join(chunks[out_r]).decode(errors="replace"),
        stderr=b"".join(chunks[err_r]).decode(errors="replace"),
    )


def run_cli(main: Callable[[], int], interrupted: str) -> NoReturn:
    """Exit with ``main()``'s status; on Ctrl-C, or SIGTERM where the script routes it to
    ``signal.default_int_handler``, with 130 and ``interrupted`` on stderr (by then the
    script's ``finally`` blocks have stopped its servers and removed its files)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)


def tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# --- servers -----------------------------------------------------------------------------------

VSFTPD_CONF = """\
# vsftpd for the medstream benchmark (generated; anonymous upload into a tmpfs directory)
listen=YES
listen_ipv6=NO
listen_address={bind}
listen_port={port}
background=NO
anonymous_enable=YES
no_anon_password=YES
anon_root={root}
write_enable=YES
anon_upload_enable=YES
anon_mkdir_write_enable=YES
anon_other_write_enable=YES
anon_umask=022
local_enable=NO
pasv_enable=YES
pasv_address={bind}
pasv_min_port={pasv_lo}
pasv_max_port={pasv_hi}
secure_chroot_dir={empty}
seccomp_sandbox=NO
isolate=NO
isolate_network=NO
xferlog_enable=NO
max_clients=200
max_per_ip=200
use_localtime=NO
"""
# Explicit FTPS (AUTH TLS) beside plain FTP on the same server: what a user who must encrypt
# medical images would pick. TLS is offered, not forced, so plaintext clients still work;
# no session-reuse requirement (Python's ftplib does not resume the control session's).
VSFTPD_TLS_CONF = """\
ssl_enable=YES
allow_anon_ssl=YES
force_anon_logins_ssl=NO
force_anon_data_ssl=NO
ssl_tlsv1=YES
ssl_sslv2=NO
ssl_sslv3=NO
require_ssl_reuse=NO
ssl_request_cert=NO
ssl_ciphers=HIGH
rsa_cert_file={cert}
rsa_private_key_file={key}
"""


@dataclass
class Vsftpd:
    """vsftpd with its own config: anonymous upload into ``root/incoming``; with ``tls`` (a
    certificate and key) it also offers explicit FTPS."""

    workdir: Path
    bind: str = "127.0.0.1"
    port: int = 0
    spawn: Spawner = local_popen
    tls: tuple[Path, Path] | None = None
    proc: subprocess.Popen[Any] | None = field(default=None, repr=False)

    @property
    def incoming(self) -> Path:
        return self.workdir / "ftproot" / "incoming"

    def start(self) -> Vsftpd:
        exe = need_tool("vsftpd")
        root = self.workdir / "ftproot"
        empty = self.workdir / "empty"
        for d in (root, empty, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # vsftpd refuses a writable anonymous root
        shutil.chown(self.incoming, user="ftp")
        if not self.port:
            self.port = free_port(self.bind) if self.bind.startswith("127.") else 2121
        pasv_lo = 30000 + (self.port * 7) % 20000
        conf = self.workdir / "vsftpd.conf"
        text = VSFTPD_CONF.format(bind=self.bind, port=self.port, root=root, empty=empty,
                                  pasv_lo=pasv_lo, pasv_hi=pasv_lo + 400)
        if self.tls is not None:
            text += VSFTPD_TLS_CONF.format(cert=self.tls[0], key=self.tls[1])
        conf.write_text(text)
        self.proc = start_server(self.spawn, [exe, str(conf)], self.workdir / "vsftpd.out",
                                 self.bind, [self.port])
        return self

    def stop(self) -> None:
        stop(self.proc)


@dataclass
class Storescp:
    """dcmtk storescp (one process; ``--fork`` per association), TCP_NODELAY=1, max PDU."""

    workdir: Path
    port: int = 0
    host: str = "127.0.0.1"   # where clients connect (storescp listens on every address)
    spawn: Spawner = local_popen
    proc: subprocess.Popen[Any] | None = field(default=None, repr=False)

    @property
    def out(self) -> Path:
        return self.workdir / "received"

    def start(self) -> Storescp:
        exe = need_tool("storescp")
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host) if self.host.startswith("127.") else 11112
        self.proc = start_server(
            self.spawn, [exe, "--fork", "+xa", "-dhl", "-pdu", "131072", "-od", str(self.out),
                         "-aet", "BENCHSCP", str(self.port)],
            self.workdir / "storescp.out", self.host, [self.port],
            env={"TCP_NODELAY": "1"}, group=True)
        return self

    def stop(self) -> None:
        # --fork children are in the same session: end the whole group we started
        stop_group(self.proc)


def storescu_argv(host: str, port: int, files: Sequence[Path], *, rle: bool) -> list[str]:
    argv = [need_tool("storescu"), "-aet", "BENCHSCU", "-aec", "BENCHSCP", "-pdu", "131072"]
    if rle:
        argv.append("-xr")  # propose RLE Lossless so the files go as they are
    return [*argv, host, str(port), *map(str, files)]


@dataclass
class Transferd:
    """One medstream node daemon (``transferd``) with its own storage root."""

    workdir: Path
    bind: str = "127.0.0.1"
    port: int = 0
    erl3d_port: int = 0
    tls: tuple[Path, Path] | None = None   # (cert, key)
    token_file: Path | None = None
    spawn: Spawner = local_popen
    proc: subprocess.Popen[Any] | None = field(default=None, repr=False)

    @property
    def storage(self) -> Path:
        return self.workdir / "store"

    @property
    def address(self) -> str:
        return f"{self.bind}:{self.port}"

    def start(self) -> Transferd:
        exe = need_tool("transferd")
        self.storage.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.bind) if self.bind.startswith("127.") else 7370
        argv = [exe, "--bind", self.bind, "--port", str(self.port),
                "--storage-root", str(self.storage), "--log-file",
                str(self.workdir / "transferd.log")]
        if self.erl3d_port:
            argv += ["--erl3d-port", str(self.erl3d_port)]
        if self.tls is None:
            argv.append("--insecure-plaintext")
        else:
            argv += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
            if self.token_file is not None:
                argv += ["--token-file", str(self.token_file)]
        self.proc = start_server(self.spawn, argv, self.workdir / "transferd.out", self.bind,
                                 [self.port, *([self.erl3d_port] if self.erl3d_port else [])])
        return self

    def stop(self) -> None:
        stop(self.proc)


def make_pki(workdir: Path, nodes: Sequence[tuple[str, str]]) -> tuple[Path, dict[str, tuple[Path,
                                                                                              Path]]]:
    """A CA and one certificate per (name, ip) with medstream's own ``transfer pki``."""
    exe = need_tool("transfer")
    ca = workdir / "pki"
    if not (ca / "ca.crt").exists():
        subprocess.run([exe, "pki", "init", str(ca)], check=True, capture_output=True, timeout=60)
    certs: dict[str, tuple[Path, Path]] = {}
    for name, ip in nodes:
        crt, key = ca / f"{name}.crt", ca / f"{name}.key"
        if not crt.exists():
            cp = subprocess.run([exe, "pki", "issue", str(ca), "--name", name, "--ip", ip],
                                capture_output=True, text=True, timeout=60)
            if cp.returncode != 0:
                raise BenchError(f"transfer pki issue failed: {tail(cp.stderr)}")
        certs[name] = (crt, key)
    return ca / "ca.crt", certs


# --- series and results ------------------------------------------------------------------------

def series(cache: Path, *, slices: int, kind: str, rows: int = 640, cols: int = 640,
           seed: int = 0) -> list[Path]:
    """The generated series, cached under ``cache`` (regenerated if incomplete)."""
    from transfer.synth import generate_series

    d = cache / f"{kind}-{slices}x{rows}x{cols}-s{seed}"
    done = cache / f"{d.name}.complete"  # beside, not inside: uploaders walk the directory
    files = sorted(d.glob("CT*.dcm"))
    if len(files) == slices and done.exists():
        return files
    shutil.rmtree(d, ignore_errors=True)
    done.unlink(missing_ok=True)
    print(f"generating {slices} {kind} slices {rows}x{cols} into {d} ...", flush=True)
    files = generate_series(d, slices=slices, rows=rows, cols=cols, kind=kind, seed=seed)
    done.write_text("ok\n")
    return files


def tree_stats(root: Path, suffix: str = "") -> tuple[int, int]:
    """(files, bytes) under root, skipping SQLite/temp files when a suffix is given."""
    n = total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if suffix and not name.endswith(suffix):
                continue
            n += 1
            total += os.path.getsize(os.path.join(dirpath, name))
    return n, total


def summarize(values: Sequence[float]) -> dict[str, float]:
    vals = list(values)
    if not vals:
        return {}
    return {
        "n": len(vals),
        "median": statistics.median(vals),
        "mean": statistics.fmean(vals),
        "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
    }


def code_version() -> str:
    """The medstream code a figure measures: the last commit that changed ``transfer/*.py``
    (short hash), with ``+changes`` if those files differ from it; empty outside git. Commits
    to the benchmarks or the docs do not change it."""
    git = ["git", "-C", str(REPO)]
    try:
        last = subprocess.run([*git, "log", "-1", "--format=%h", "--", "transfer/*.py"],
                              capture_output=True, text=True, timeout=10)
        if last.returncode != 0:
            return ""
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "transfer/*.py"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return last.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {
        "code": code_version(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    # The senders' TCP congestion control shapes every figure (BBR paces at its estimate, cubic
    # fills the queue); lab hosts inherit the root namespace's default.
    from labnet.lab import congestion_control

    if cc := congestion_control():
        info["tcp_congestion_control"] = cc
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["vsftpd"] = "vsftpd " + subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "vsftpd"], capture_output=True, text=True,
            timeout=10).stdout
        info["dcmtk"] = "dcmtk " + subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "dcmtk"], capture_output=True, text=True,
            timeout=10).stdout
    return info


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def scratch(base: Path, name: str) -> Iterator[Path]:
    """A fresh directory under base (tmpfs for the benchmarks), removed afterwards."""
    d = base / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
