"""The xenctl command line against xapisim through the real SDK: help, settings precedence, TLS
modes, secrets, exit codes, and `up` / `down` phase reporting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from xenctl_helpers import NODE_CIDR, NODE_NETWORK, NODE_TEMPLATE, fleet_state, sim_spec

from xapisim import SimServer
from xenctl.cli import cli
from xenctl.errors import TLSError
from xenctl.session import connect
from xenctl.spec import Secret


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any XENCTL_* / XENSERVER_* (CliRunner's env only
    adds or overrides, so the unwanted ones are set empty, which xenctl reads as unset)."""
    env = {k: "" for k in os.environ if k.startswith(("XENCTL_", "XENSERVER_"))}
    env.update(extra)
    return env


@pytest.mark.parametrize(("args", "words"), [
    ([], ["Exit codes", "XENCTL_", "--insecure", "password is never an argument", "up --sim"]),
    (["pool"], ["create", "status", "failover", "eject"]),
    (["pool", "create"], ["pool.join", "idempotent", "--dry-run"]),
    (["pool", "status"], ["json", "HOST_IS_SLAVE"]),
    (["pool", "failover"], ["designate_new_master", "emergency_transition_to_master",
                            "recover_slaves"]),
    (["pool", "eject"], ["pool.eject", "local storage is lost"]),
    (["scale-nodes"], ["other_config", "event.from", "shortfall", "--dry-run", "Exit 0"]),
    (["inventory"], ["--list", "--host", "ansible_host"]),
    (["up"], ["pool", "nodes", "inventory", "deploy", "smoke", "run the same command again",
              "--sim", "Ctrl-C"]),
    (["down"], ["disks", "Exit 2"]),
])
def test_every_command_explains_itself(args: list[str], words: list[str]) -> None:
    out = CliRunner().invoke(cli, [*args, "--help"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    for w in words:
        assert w in text, (args, w)


def test_precedence_flag_over_env_over_file(sim: SimServer, tmp_path: Path) -> None:
    """Three standalone hosts, each its own master: which one answers shows which setting won
    (cloud.yml names host-2, the environment host-1, the flag host-3)."""
    addr = [f"{h.address}:{sim.port}" for h in sim.hosts]
    cfg = tmp_path / "cloud.yml"
    cfg.write_text(f"pool:\n  master: {addr[1]}\n  tls:\n    ca_file: {sim.ca_file}\n")
    runner = CliRunner()
    base = _clean_env(XENCTL_PASSWORD=sim.password)

    def master(args: list[str], env: dict[str, str]) -> str:
        out = runner.invoke(cli, ["-c", str(cfg), *args, "pool", "status", "-o", "json"], env=env)
        assert out.exit_code == 0, out.output
        return str(json.loads(out.output)["master"])

    assert master([], base) == "host-2"  # the file
    assert master([], {**base, "XENCTL_MASTER": addr[0]}) == "host-1"  # env beats the file
    assert master([], {**base, "XENSERVER_HOST": addr[0]}) == "host-1"  # (the Ansible name too)
    assert master(["--master", addr[2]], {**base, "XENCTL_MASTER": addr[0]}) == "host-3"
    # XENSERVER_PASSWORD (the Ansible modules' name) works too; a wrong one is refused
    assert master([], _clean_env(XENSERVER_PASSWORD=sim.password)) == "host-2"
    out = runner.invoke(cli, ["-c", str(cfg), "pool", "status"],
                        env=_clean_env(XENSERVER_PASSWORD="nope"))
    assert out.exit_code == 1 and "authentication failed" in out.output
    # a bad value names where it came from
    out = runner.invoke(cli, ["-c", str(cfg), "pool", "status"],
                        env={**base, "XENCTL_MASTER": "ftp://x"})
    assert out.exit_code == 1 and "XENCTL_MASTER: pool.master:" in out.output
    out = runner.invoke(cli, ["-c", str(cfg), "--master", "ftp://x", "pool", "status"], env=base)
    assert out.exit_code == 1 and "--master: pool.master:" in out.output


def test_system_ca_store_is_used_by_default(sim: SimServer, monkeypatch: Any) -> None:
    """Without ca_file or pins xenctl verifies against the system CAs (OpenSSL's default paths,
    which SSL_CERT_FILE points at here): the simulator's CA in the store is accepted."""
    spec = sim_spec(sim, **{"pool.tls.ca_file": None})
    pw = Secret(sim.password)
    with pytest.raises(TLSError, match="not trusted"):
        connect(spec.pool, pw, url=spec.pool.master)
    monkeypatch.setenv("SSL_CERT_FILE", sim.ca_file)
    x = connect(spec.pool, pw, url=spec.pool.master)
    try:
        assert len(x.call("host.get_all")) == 1
    finally:
        x.logout()


def test_insecure_flag_works_and_is_loud(sim: SimServer) -> None:
    master = f"{sim.hosts[0].address}:{sim.port}"
    env = _clean_env(XENCTL_PASSWORD=sim.password, XENCTL_MASTER=master)
    out = CliRunner().invoke(cli, ["pool", "status"], env=env)  # no CA given: refused
    assert out.exit_code == 1 and "not trusted" in out.output and "tls.ca_file" in out.output
    out = CliRunner().invoke(cli, ["--insecure", "pool", "status"], env=env)
    assert out.exit_code == 0, out.output
    assert "WARNING: TLS verification is OFF" in out.output and "host-1" in out.output


def test_pinned_fingerprint_flag(sim: SimServer) -> None:
    master = f"{sim.hosts[0].address}:{sim.port}"
    env = _clean_env(XENCTL_PASSWORD=sim.password, XENCTL_MASTER=master)
    fp = sim.fingerprints["host-1"]
    out = CliRunner().invoke(cli, ["--fingerprint", f"{sim.hosts[0].address}={fp}", "pool",
                                   "status"], env=env)
    assert out.exit_code == 0, out.output
    wrong = sim.fingerprints["host-2"]
    out = CliRunner().invoke(cli, ["--fingerprint", wrong, "pool", "status"], env=env)
    assert out.exit_code == 1 and "not pinned" in out.output


def test_pool_create_keeps_the_password_out_of_argv_and_logs(sim: SimServer,
                                                              tmp_path: Path) -> None:
    """pool create sends the password to every member (pool.join): not on any command line,
    not in -vv logs or output. The password comes from a file here (--password-file)."""
    pwfile = tmp_path / "pw"
    pwfile.write_text(sim.password + "\n")
    pwfile.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XENCTL_", "XENSERVER_"))}
    env.update({"XENCTL_CA_FILE": sim.ca_file, "PYTHONUNBUFFERED": "1",
                "XENCTL_MEMBERS": ",".join(f"{h.address}:{sim.port}" for h in sim.hosts[1:])})
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenctl.cli", "-vv", "--password-file", str(pwfile),
         "--master", f"{sim.hosts[0].address}:{sim.port}", "pool", "create"],
        env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    cmdlines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                try:
                    cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes()
                                    .replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    continue
            time.sleep(0.02)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 2, out
    assert "pool.join" in out  # the progress names the call that carries the password
    assert any("pool create" in c for c in cmdlines)
    assert not any(sim.password in c for c in cmdlines)
    assert sim.password not in out
    assert len(sim.session().xenapi.host.get_all()) == 3


def test_up_and_down_exit_codes_and_failed_phase(sim: SimServer, tmp_path: Path) -> None:
    """`up` on a real pool (here xapisim) without deploy/smoke: 2 when it changed things, 0 on a
    re-run; a failing phase is named with how to resume; `down` removes the fleet: 2, then 0."""
    env = _clean_env(
        XENCTL_PASSWORD=sim.password, XENCTL_CA_FILE=sim.ca_file,
        XENCTL_MASTER=f"{sim.hosts[0].address}:{sim.port}",
        XENCTL_MEMBERS=",".join(f"{h.address}:{sim.port}" for h in sim.hosts[1:]),
        XENCTL_TEMPLATE=NODE_TEMPLATE, XENCTL_NETWORK=NODE_NETWORK, XENCTL_CIDR=NODE_CIDR)
    inv = tmp_path / "inventory" / "hosts.yml"
    args = ["up", "--nodes", "3", "--skip", "deploy,smoke", "--inventory", str(inv)]
    runner = CliRunner()
    out = runner.invoke(cli, args, env=env)
    assert out.exit_code == 2, out.output
    for line in ("== pool", "== nodes", "== inventory", "== deploy: skipped", "node-03: up at"):
        assert line in out.output, line  # progress for every phase
    assert inv.is_file()
    out = runner.invoke(cli, args, env=env)
    assert out.exit_code == 0, out.output
    bad = runner.invoke(cli, ["up", "--nodes", "4", "--skip", "deploy,smoke", "--inventory",
                              str(inv)], env={**env, "XENCTL_TEMPLATE": "no such template"})
    assert bad.exit_code == 1
    last = bad.output.strip().splitlines()[-1]
    assert last.startswith("xenctl: error: phase 'nodes' failed: nodes.template: no template")
    assert "run the same command again" in last
    out = runner.invoke(cli, ["down", "--inventory", str(inv)], env=env)
    assert out.exit_code == 1 and "needs --yes" in out.output  # no terminal: never silently
    assert len(fleet_state(sim)["fleet"]) == 3
    out = runner.invoke(cli, ["down", "--yes", "--inventory", str(inv)], env=env)
    assert out.exit_code == 2, out.output
    assert fleet_state(sim)["fleet"] == {}
    out = runner.invoke(cli, ["down", "--yes", "--inventory", str(inv)], env=env)
    assert out.exit_code == 0, out.output


def test_up_summary_shows_what_each_node_received(capsys: Any) -> None:
    """The node table after `up` joins transfer's report, which labels nodes by name (or
    host:port when the workstation's config has no names)."""
    from xenctl.cli import _print_up
    from xenctl.nodes import NodeResult
    from xenctl.up import Phase, UpResult

    res = UpResult(phases=[Phase("study", changed=True, seconds=1.0, detail="360 images")],
                   nodes=[NodeResult(1, "node-01", ip="10.213.5.11", host="host-1"),
                          NodeResult(2, "node-02", ip="10.213.5.12", host="host-2")],
                   study={"nodes": [
                       {"node": "node-01", "files": 200, "bytes": 160e6, "mb_per_s": 80.0},
                       {"node": "10.213.5.12:7370", "files": 160, "bytes": 130e6,
                        "mb_per_s": 70.0}]})
    _print_up(res, time.monotonic())
    out = capsys.readouterr().out
    assert "node-01  10.213.5.11      host-1  200 images, 160 MB, 80 MB/s" in out
    assert "node-02  10.213.5.12      host-2  160 images, 130 MB, 70 MB/s" in out
    assert "study      changed" in out
