"""`xapisim serve` as a real process: listing, 0600 credentials, SDK over verified TLS, clean exit;
and `xapisim coverage --check` keeps COVERAGE.md current."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import XenAPI

import xapisim.cli

XAPISIM = [sys.executable, "-m", "xapisim.cli"]


def test_serve_lists_hosts_writes_credentials_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "sim"
    proc = subprocess.Popen([*XAPISIM, "serve", "--hosts", "2", "--join", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("join a pool"):
                break
        text = "".join(lines)
        assert "host-1" in text and "host-2" in text and "https://127." in text, text
        assert "a pool of 2" in text
        cred_path = Path(next(ln.split()[1] for ln in lines if ln.startswith("credentials:")))
        assert stat.S_IMODE(cred_path.stat().st_mode) == 0o600
        creds = json.loads(cred_path.read_text())
        assert creds["password"] not in text  # never printed
        host = creds["hosts"][0]
        import ssl
        import xmlrpc.client
        transport = xmlrpc.client.SafeTransport(context=ssl.create_default_context(cafile=creds["ca_file"]))
        s = XenAPI.Session(host["url"], transport=transport)
        s.xenapi.login_with_password(creds["username"], creds["password"], "", "test")
        assert len(s.xenapi.host.get_all()) == 2  # joined
        pool = s.xenapi.pool.get_all()[0]
        assert s.xenapi.host.get_address(s.xenapi.pool.get_master(pool)) == host["address"]
        s.xenapi.session.logout()
        s("close")()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not any(workdir.iterdir()), list(workdir.iterdir())


def test_serve_bad_config_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("hosts: 2\nwat: 1\n")
    proc = subprocess.run([*XAPISIM, "serve", "--config", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "wat" in proc.stderr


def test_coverage_file_is_current() -> None:
    proc = subprocess.run([*XAPISIM, "coverage", "--check"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    text = (Path(xapisim.cli.__file__).parent / "COVERAGE.md").read_text()
    assert "- [X] VM.start (custom, async)" in text
    assert "- [ ] VM.send_sysrq" in text
