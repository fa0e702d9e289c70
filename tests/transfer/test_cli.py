"""The console scripts as a user runs them: `transfer pki`, `transferd`, `transfer upload|ls|stat|get`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from transfer_helpers import make_series

from transfer import cli as transfer_cli
from transfer.config import load_daemon_config, parse_node
from transfer.daemon import cli as transferd_cli
from transfer.errors import ConfigError

BIN = Path(sys.executable).parent
TRANSFER = [str(BIN / "transfer")]
TRANSFERD = [str(BIN / "transferd")]


def run(args: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]


class Daemon:
    def __init__(self, workdir: Path, args: list[str], port: int = 0) -> None:
        self.ready = workdir / f"ready-{time.monotonic_ns()}.json"
        self.log = workdir / "transferd.log"
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [*TRANSFERD, "--bind", "127.0.0.1", "--port", str(port), "--ready-file", str(self.ready), *args],
                stdout=subprocess.DEVNULL,
                stderr=logf,
            )
        deadline = time.monotonic() + 30
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transferd did not start: {self.log.read_text()}")
            time.sleep(0.05)
        self.port = int(json.loads(self.ready.read_text())["port"])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@contextlib.contextmanager
def daemon(workdir: Path, args: list[str], port: int = 0) -> Iterator[Daemon]:
    d = Daemon(workdir, args, port)
    try:
        yield d
    finally:
        d.stop(signal.SIGKILL if d.proc.poll() is None else signal.SIGTERM)


@pytest.fixture(scope="module")
def pki_cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clipki")
    r = run([*TRANSFER, "pki", "init", str(d)])
    assert r.returncode == 0, r.stderr
    assert (d / "ca.crt").exists() and (d / "token").stat().st_mode & 0o777 == 0o600
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600
    r = run([*TRANSFER, "pki", "issue", str(d), "--name", "node-01", "--ip", "127.0.0.1"])
    assert r.returncode == 0, r.stderr
    again = run([*TRANSFER, "pki", "init", str(d)])
    assert again.returncode == 1 and "already exists" in again.stderr
    return d


def tls_args(pki: Path, root: Path) -> list[str]:
    return [
        "--storage-root", str(root), "--tls-cert", str(pki / "node-01.crt"),
        "--tls-key", str(pki / "node-01.key"), "--token-file", str(pki / "token"),
    ]


def client_args(pki: Path, port: int) -> list[str]:
    return ["--nodes", f"127.0.0.1:{port}", "--ca-file", str(pki / "ca.crt"), "--token-file", str(pki / "token")]


def test_upload_ls_stat_get_over_tls(tmp_path: Path, pki_cli: Path) -> None:
    files = make_series(tmp_path / "series", 12, rows=64, cols=64, seed=7)
    with daemon(tmp_path, tls_args(pki_cli, tmp_path / "root")) as d:
        report = tmp_path / "report.json"
        r = run([*TRANSFER, "upload", str(tmp_path / "series"), *client_args(pki_cli, d.port),
                 "--json-report", str(report), "--progress", "--memory-budget", "3"])
        assert r.returncode == 0, r.stderr
        assert "MB/s" in r.stderr  # the progress bar
        assert "total" in r.stdout
        rep = json.loads(report.read_text())
        assert rep["ok"] and rep["total"]["files"] == 12
        node = rep["nodes"][0]
        assert node["files"] == 12 and node["bytes"] == sum(f.stat().st_size for f in files)
        assert node["seconds"] > 0 and node["mb_per_s"] > 0
        assert rep["memory"]["budget"] == 3 << 20 and 0 < rep["memory"]["peak"] <= 3 << 20
        ph = rep["phases"]  # where `seconds` went: to the first FILE, to the last ACK, closing
        assert 0 < ph["first_file_s"] < ph["last_ack_s"] <= rep["seconds"]
        assert ph["closing_s"] == pytest.approx(rep["seconds"] - ph["last_ack_s"], abs=2e-4)
        r = run([*TRANSFER, "ls", *client_args(pki_cli, d.port)])
        assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 12
        sop = r.stdout.split("\t")[3]
        r = run([*TRANSFER, "stat", sop, *client_args(pki_cli, d.port)])
        assert r.returncode == 0 and json.loads(r.stdout)[0]["sop"] == sop
        study = json.loads(r.stdout)[0]["study"]
        r = run([*TRANSFER, "get", str(tmp_path / "out"), "--study", study, *client_args(pki_cli, d.port)])
        assert r.returncode == 0, r.stderr
        got = sorted((tmp_path / "out").rglob("*.dcm"))
        assert sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in got) == sorted(
            hashlib.sha256(f.read_bytes()).hexdigest() for f in files
        )
        r = run([*TRANSFER, "stat", "1.2.3.4", *client_args(pki_cli, d.port)])
        assert r.returncode == 1 and r.stderr.startswith("transfer: error:") and "Traceback" not in r.stderr
        # A re-run sends nothing and still exits 0.
        r = run([*TRANSFER, "upload", str(tmp_path / "series"), *client_args(pki_cli, d.port), "--json-report", str(report)])
        again = json.loads(report.read_text())
        assert r.returncode == 0 and again["total"]["already"] == 12
        assert again["phases"] == {}  # no FILE went out


def test_clear_errors_for_bad_input(tmp_path: Path, pki_cli: Path) -> None:
    r = run([*TRANSFER, "upload", str(tmp_path), "--nodes", "127.0.0.1:1"])
    assert r.returncode == 1 and "--ca-file" in r.stderr
    r = run([*TRANSFER, "upload", str(tmp_path), "--nodes", "nonsense:port", "--insecure-plaintext"])
    assert r.returncode == 1 and "bad node address" in r.stderr
    r = run([*TRANSFERD, "--storage-root", str(tmp_path), "--tls-cert", "/nonexistent.crt", "--port", "0"])
    assert r.returncode == 1 and "cannot load TLS certificate" in r.stderr
    r = run([*TRANSFERD, "--storage-root", str(tmp_path), "--insecure-plaintext", "--max-frame", "12"])
    assert r.returncode == 1 and "max_frame" in r.stderr
    for cmd in (TRANSFER, TRANSFERD):
        r = run([*cmd, "--help"])
        assert r.returncode == 0 and "Usage" in r.stdout


def test_plaintext_is_logged_loudly(tmp_path: Path) -> None:
    with daemon(tmp_path, ["--storage-root", str(tmp_path / "root"), "--insecure-plaintext"]) as d:
        pass
    assert d.proc.returncode is not None
    assert "INSECURE" in d.log.read_text()


def test_node_killed_mid_upload_then_rerun_completes(tmp_path: Path) -> None:
    n = 120
    make_series(tmp_path / "series", n, rows=384, cols=384, seed=11)  # ~35 MB
    root = tmp_path / "root"
    args = ["--storage-root", str(root), "--insecure-plaintext"]
    d = Daemon(tmp_path, args)
    port = d.port
    report = tmp_path / "r.json"
    up = subprocess.Popen(
        [*TRANSFER, "upload", str(tmp_path / "series"), "--nodes", f"127.0.0.1:{port}",
         "--insecure-plaintext", "--connections", "1", "--retries", "2", "--json-report", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(root.rglob("*.dcm"))) < 3:
            assert time.monotonic() < deadline and up.poll() is None, "upload never started"
            time.sleep(0.005)
        d.stop(signal.SIGKILL)
        stored_at_kill = len(list(root.rglob("*.dcm")))
        out, err = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert stored_at_kill < n, "upload finished before the kill; make the series bigger"
    assert up.returncode == 1, err
    first = json.loads(report.read_text())
    assert not first["ok"] and first["failed"]
    # Restart on the same port and storage: leftovers are cleaned, a re-run sends only the rest.
    with daemon(tmp_path, args, port=port) as d2:
        assert not list(root.rglob(".tmp-*"))
        r = run([*TRANSFER, "upload", str(tmp_path / "series"), "--nodes", f"127.0.0.1:{d2.port}",
                 "--insecure-plaintext", "--json-report", str(report)])
        assert r.returncode == 0, r.stderr
        second = json.loads(report.read_text())
        assert second["total"]["already"] >= first["total"]["files"] > 0
        assert second["total"]["files"] + second["total"]["already"] == n
        assert second["total"]["files"] < n
    stored = sorted(root.rglob("*.dcm"))
    assert len(stored) == n
    src = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "series").iterdir()}
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in stored} == src


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_on_a_node(tmp_path: Path) -> None:
    from test_storage import tiny_tmpfs

    make_series(tmp_path / "series", 8, rows=256, cols=256, seed=5)  # 8 x ~130 KB
    with tiny_tmpfs(tmp_path / "disk", "500k") as disk:
        with daemon(tmp_path, ["--storage-root", str(disk), "--insecure-plaintext"]) as d:
            report = tmp_path / "r.json"
            r = run([*TRANSFER, "upload", str(tmp_path / "series"), "--nodes", f"127.0.0.1:{d.port}",
                     "--insecure-plaintext", "--json-report", str(report)])
            assert r.returncode == 1
            rep = json.loads(report.read_text())
            assert rep["total"]["files"] >= 1 and rep["failed"]
            assert all("disk full" in f["reason"] for f in rep["failed"]), rep["failed"]
            assert not list(disk.rglob(".tmp-*"))
            for p in disk.rglob("*.dcm"):  # what is visible is whole
                assert p.stat().st_size == (tmp_path / "series" / "slice0000.dcm").stat().st_size
            # The node still answers.
            r = run([*TRANSFER, "ls", "--nodes", f"127.0.0.1:{d.port}", "--insecure-plaintext"])
            assert r.returncode == 0 and len(r.stdout.splitlines()) == rep["total"]["files"]


def test_config_precedence(tmp_path: Path) -> None:
    cfg_file = tmp_path / "t.toml"
    cfg_file.write_text('[transferd]\nport = 1111\nmax_connections = 7\nidle_timeout = 5\nstorage_root = "/x"\n')
    cfg = load_daemon_config(str(cfg_file), {"port": 3333}, {"TRANSFERD_PORT": "2222", "TRANSFERD_MAX_CONNECTIONS": "9"})
    assert (cfg.port, cfg.max_connections, cfg.idle_timeout, cfg.storage_root) == (3333, 9, 5.0, "/x")
    cfg = load_daemon_config(str(cfg_file), {}, {"TRANSFERD_INSECURE_PLAINTEXT": "yes"})
    assert cfg.port == 1111 and cfg.insecure_plaintext is True
    with pytest.raises(ConfigError, match="unknown keys"):
        cfg_file.write_text("[transferd]\nprot = 1\n")
        load_daemon_config(str(cfg_file), {}, {})
    with pytest.raises(ConfigError, match="invalid value"):
        load_daemon_config(None, {}, {"TRANSFERD_PORT": "eighty"})
    assert parse_node("n1=10.213.5.11:7370").name == "n1"
    assert parse_node("[::1]:9").host == "::1"
    with pytest.raises(ConfigError):
        parse_node("host:99999")


BAD_INPUT = [
    (["upload", "{empty}", "--nodes", "127.0.0.1:1", "--insecure-plaintext"], "no files to upload"),
    (["upload", "{dicom}", "--nodes", "127.0.0.1:1", "--insecure-plaintext", "--connections", "0"], "--connections"),
    (["upload", "{dicom}", "--nodes", "127.0.0.1:1", "--insecure-plaintext", "--retries", "-1"], "--retries"),
    (["upload", "{dicom}", "--nodes", "127.0.0.1:1", "--insecure-plaintext", "--replicas", "2"], "--replicas"),
    (["upload", "{dicom}", "--nodes", "127.0.0.1:1", "--insecure-plaintext", "--json-report", "/nonexistent/r.json"], "/nonexistent"),
    (["upload", "{dicom}", "--nodes", "127.0.0.1:1", "--ca-file", "/nonexistent.crt", "--token-file", "/x"], "cannot load TLS files"),
    (["upload", "{dicom}", "--config", "{garbage}"], "config file"),
    (["upload", "{nowhere}", "--nodes", "127.0.0.1:1", "--insecure-plaintext"], "does not exist"),
    (["upload", "{dicom}", "--nodes", "127.0.0.1:1", "--protocol", "erl3d", "--zstd"], "erl3d"),
    (["ls", "--nodes", "127.0.0.1:1", "--insecure-plaintext"], "cannot connect"),
    (["get", "{tmp}/out", "--nodes", "127.0.0.1:1", "--insecure-plaintext"], "give --study"),
    (["get", "{tmp}/out", "--study", "1.2", "--nodes", "127.0.0.1:1", "--insecure-plaintext"], "cannot connect"),
    (["stat", "--nodes", "127.0.0.1:1", "--insecure-plaintext"], "SOP Instance UID"),
    (["pki", "issue", "{empty}", "--name", "n"], "no CA"),
    (["pki", "issue", "{empty}", "--name", "../n"], "bad certificate name"),
    (["synth", "{tmp}/synth", "--slices", "0"], "slices"),
]
BAD_DAEMON = [
    (["--storage-root", "{tmp}/r", "--port", "0", "--tls-cert", "/nonexistent.crt"], "cannot load TLS certificate"),
    (["--storage-root", "{tmp}/r", "--insecure-plaintext", "--port", "99999"], "port"),
    (["--storage-root", "{tmp}/r", "--insecure-plaintext", "--idle-timeout", "-1"], "idle_timeout"),
    (["--storage-root", "{tmp}/r", "--insecure-plaintext", "--bind", "name.invalid", "--port", "0"], "cannot listen on name.invalid"),
    (["--storage-root", "{tmp}/r", "--port", "0", "--tls-cert", "{pki}/node-01.crt", "--tls-key", "{pki}/node-01.key", "--token-file", "/nonexistent"], "token file"),
    (["--config", "{garbage}"], "config file"),
    (["--storage-root", "/proc/medstream", "--insecure-plaintext", "--port", "0"], "storage root"),
]


@pytest.mark.parametrize(("cmd", "argv", "expect"), [("transfer", a, e) for a, e in BAD_INPUT] + [("transferd", a, e) for a, e in BAD_DAEMON])
def test_bad_input_is_one_clear_line(tmp_path: Path, pki_cli: Path, cmd: str, argv: list[str], expect: str) -> None:
    (tmp_path / "empty").mkdir()
    make_series(tmp_path / "dicom", 1)
    (tmp_path / "garbage").write_text("this is = = not toml [\n")
    subst = {"tmp": str(tmp_path), "empty": str(tmp_path / "empty"), "dicom": str(tmp_path / "dicom"),
             "garbage": str(tmp_path / "garbage"), "nowhere": str(tmp_path / "nowhere"), "pki": str(pki_cli)}
    r = run([*(TRANSFER if cmd == "transfer" else TRANSFERD), *(a.format(**subst) for a in argv)], timeout=60)
    assert r.returncode in (1, 2), (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert expect in r.stderr, r.stderr
    if r.returncode == 1:  # ours (2 is click's usage error: usage line + one error line)
        errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower() and " WARNING " not in ln]
        assert len(errors) == 1 and errors[0].startswith(f"{cmd}: error: "), r.stderr


def _commands(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, f"{path} {name}")


@pytest.mark.parametrize("root", [transfer_cli.cli, transferd_cli], ids=["transfer", "transferd"])
def test_every_command_and_option_has_help(root: click.Command) -> None:
    for path, cmd in _commands(root, root.name or "?"):
        assert (cmd.help or "").strip(), f"{path}: no help text"
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert (p.help or "").strip(), f"{path} {p.opts}: no help text"


@pytest.mark.parametrize("argv", [[], ["upload"], ["ls"], ["stat"], ["get"], ["pki", "issue"], ["synth"]])
def test_help_runs(argv: list[str]) -> None:
    r = run([*TRANSFER, *argv, "--help"])
    assert r.returncode == 0 and "Usage: transfer" in r.stdout and "Options:" in r.stdout


def test_transferd_help_explains() -> None:
    r = run([*TRANSFERD, "--help"])
    assert r.returncode == 0
    for word in ("--storage-root", "--tls-cert", "--client-ca", "--token-file", "--insecure-plaintext", "--erl3d-port",
                 "--max-frame", "--max-connections", "--idle-timeout", "TRANSFERD_"):
        assert word in r.stdout, word


def _run_on_tty(argv: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (as a user at a terminal); return (rc, stderr)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    finally:
        os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, out.decode(errors="replace")


def test_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    make_series(tmp_path / "s", 6, rows=64, cols=64)
    with daemon(tmp_path, ["--storage-root", str(tmp_path / "root"), "--insecure-plaintext"]) as d:
        base = [*TRANSFER, "upload", str(tmp_path / "s"), "--nodes", f"127.0.0.1:{d.port}", "--insecure-plaintext", "--no-resume"]
        rc, err = _run_on_tty(base)
        assert rc == 0, err
        assert "6/6 files" in err and "MB/s" in err and "\r[" in err  # the bar, redrawn in place
        rc, err = _run_on_tty([*base, "--no-progress"])
        assert rc == 0 and "MB/s" not in err and "files" not in err, err
        r = run(base)  # stderr is a pipe: no bar unless asked for
        assert r.returncode == 0 and "MB/s" not in r.stderr, r.stderr


def test_node_killed_and_restarted_during_one_upload_run_completes_by_retrying(tmp_path: Path) -> None:
    n = 120
    make_series(tmp_path / "series", n, rows=384, cols=384, seed=12)  # ~35 MB
    root = tmp_path / "root"
    args = ["--storage-root", str(root), "--insecure-plaintext"]
    d = Daemon(tmp_path, args)
    report = tmp_path / "r.json"
    up = subprocess.Popen(
        [*TRANSFER, "upload", str(tmp_path / "series"), "--nodes", f"127.0.0.1:{d.port}",
         "--insecure-plaintext", "--retries", "10", "--json-report", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    d2 = None
    try:
        deadline = time.monotonic() + 60
        while len(list(root.rglob("*.dcm"))) < 3:
            assert time.monotonic() < deadline and up.poll() is None, "upload never started"
            time.sleep(0.005)
        d.stop(signal.SIGKILL)  # by PID, mid-upload
        assert len(list(root.rglob("*.dcm"))) < n, "upload finished before the kill"
        d2 = Daemon(tmp_path, args, port=d.port)  # back on the same port while the uploader backs off
        out, err = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if d2 is not None:
            d2.stop()
    assert up.returncode == 0, err
    rep = json.loads(report.read_text())
    assert rep["ok"] and rep["failed"] == []
    assert rep["nodes"][0]["reconnects"] >= 1  # it did lose the node and came back
    assert rep["total"]["files"] + rep["total"]["already"] == n
    stored = sorted(root.rglob("*.dcm"))
    src = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "series").iterdir()}
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in stored} == src
    assert len(stored) == n and not list(root.rglob(".tmp-*"))


def test_retrieval_by_study_series_instance_and_all(tmp_path: Path) -> None:
    a = make_series(tmp_path / "study" / "a", 5, seed=21)
    b = make_series(tmp_path / "study" / "b", 4, seed=22)
    # Same study for both series: rewrite b's Study Instance UID to a's.
    import pydicom

    study = str(pydicom.dcmread(a[0], stop_before_pixels=True).StudyInstanceUID)
    for p in b:
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.save_as(p)
    (tmp_path / "study" / "notes.txt").write_text("free text report\n")
    series_b = str(pydicom.dcmread(b[0], stop_before_pixels=True).SeriesInstanceUID)
    sop_a0 = str(pydicom.dcmread(a[0], stop_before_pixels=True).SOPInstanceUID)
    digest = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in [*a, *b]}
    args = ["--insecure-plaintext"]
    with (
        daemon(tmp_path, ["--storage-root", str(tmp_path / "r1"), *args]) as d1,
        daemon(tmp_path, ["--storage-root", str(tmp_path / "r2"), *args]) as d2,
    ):
        nodes = ["--nodes", f"127.0.0.1:{d1.port},127.0.0.1:{d2.port}", *args]
        r = run([*TRANSFER, "upload", str(tmp_path / "study"), *nodes])
        assert r.returncode == 1 and "notes.txt" in r.stderr  # not DICOM, not asked for
        r = run([*TRANSFER, "upload", str(tmp_path / "study"), "--allow-other", *nodes])
        assert r.returncode == 0, r.stderr
        r = run([*TRANSFER, "ls", "--series", series_b, *nodes])
        lines = r.stdout.strip().splitlines()
        assert r.returncode == 0 and len(lines) == 4 and all(series_b in ln for ln in lines)
        r = run([*TRANSFER, "ls", "--study", study, *nodes])
        assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 9
        r = run([*TRANSFER, "ls", "--json", *nodes])
        rows = [row for v in json.loads(r.stdout).values() for row in v]
        assert sorted(row["kind"] for row in rows).count("other") == 1 and len(rows) == 10

        def fetched(out: Path) -> dict[str, Path]:
            return {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in out.rglob("*") if p.is_file()}

        r = run([*TRANSFER, "get", str(tmp_path / "g1"), "--series", series_b, *nodes])
        assert r.returncode == 0, r.stderr
        got = fetched(tmp_path / "g1")
        assert set(got) == {h for h, p in digest.items() if p in b}
        for p in got.values():  # <study>/<series>/<sop>.dcm
            assert p.relative_to(tmp_path / "g1").parts[:2] == (study, series_b)
        r = run([*TRANSFER, "get", str(tmp_path / "g2"), "--sop", sop_a0, *nodes])
        assert r.returncode == 0 and list(fetched(tmp_path / "g2")) == [hashlib.sha256(a[0].read_bytes()).hexdigest()]
        assert (tmp_path / "g2" / study).is_dir()
        r = run([*TRANSFER, "get", str(tmp_path / "g3"), "--study", study, *nodes])
        assert r.returncode == 0 and set(fetched(tmp_path / "g3")) == set(digest)
        r = run([*TRANSFER, "get", str(tmp_path / "g4"), "--all", *nodes])
        assert r.returncode == 0
        assert set(fetched(tmp_path / "g4")) == set(digest) | {hashlib.sha256(b"free text report\n").hexdigest()}


def test_erl3d_through_the_console_scripts(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    erl_port = s.getsockname()[1]
    s.close()
    files = make_series(tmp_path / "s", 5, seed=31)
    with daemon(tmp_path, ["--storage-root", str(tmp_path / "root"), "--insecure-plaintext", "--erl3d-port", str(erl_port)]) as d:
        assert json.loads(d.ready.read_text())["erl3d_port"] == erl_port
        r = run([*TRANSFER, "upload", str(tmp_path / "s"), "--protocol", "erl3d", "--nodes", f"127.0.0.1:{erl_port}",
                 "--json-report", str(tmp_path / "r.json")])
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "r.json").read_text())["total"]["files"] == 5
        r = run([*TRANSFER, "get", str(tmp_path / "out"), "--all", "--nodes", f"127.0.0.1:{d.port}", "--insecure-plaintext"])
        assert r.returncode == 0, r.stderr
        got = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "out").rglob("*.dcm"))
        assert got == sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    assert "erl3d compatibility port" in d.log.read_text()
