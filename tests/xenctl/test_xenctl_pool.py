"""Pool verbs against xapisim through the real XenAPI SDK over verified HTTPS."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from xenctl_helpers import sim_spec

from xapisim import SimServer
from xenctl.cli import cli
from xenctl.errors import PoolError, TLSError, XapiConnectionError
from xenctl.pool import pool_create, pool_eject, pool_failover, pool_status
from xenctl.session import CallStats, connect, is_read_only
from xenctl.spec import Secret


def cli_args(sim: SimServer) -> list[str]:
    return ["--master", f"{sim.hosts[0].address}:{sim.port}", "--ca-file", sim.ca_file]


def cli_env(sim: SimServer) -> dict[str, str]:
    members = ",".join(f"{h.address}:{sim.port}" for h in sim.hosts[1:])
    return {"XENCTL_PASSWORD": sim.password, "XENCTL_MEMBERS": members}


def test_pool_create_forms_pool_of_three_and_rerun_changes_nothing(sim: SimServer) -> None:
    runner = CliRunner()
    first = runner.invoke(cli, [*cli_args(sim), "pool", "create", "--name", "radiology"],
                          env=cli_env(sim))
    assert first.exit_code == 2, first.output
    assert "join" in first.output
    x = sim.session().xenapi
    pools = x.pool.get_all_records()
    assert [p["name_label"] for p in pools.values()] == ["radiology"]
    assert len(x.host.get_all()) == 3
    # every member answers as a slave now (HOST_IS_SLAVE), the pool's replica is checked inside
    again = runner.invoke(cli, [*cli_args(sim), "pool", "create", "--name", "radiology"],
                          env=cli_env(sim))
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output
    status = runner.invoke(cli, [*cli_args(sim), "pool", "status", "-o", "json"], env=cli_env(sim))
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    assert data["name"] == "radiology" and data["master"] == "host-1"
    assert sorted((h["name"], h["role"], h["live"]) for h in data["hosts"]) == [
        ("host-1", "master", True), ("host-2", "member", True), ("host-3", "member", True)]
    assert all(h["api_version"] == "2.21" and 0 < h["memory_free"] < h["memory_total"]
               for h in data["hosts"])


def test_pool_create_dry_run_makes_no_mutating_call(sim: SimServer) -> None:
    stats = CallStats()
    spec = sim_spec(sim)
    res = pool_create(spec.pool, Secret(sim.password), dry_run=True, stats=stats)
    assert res.changed and len(res.actions) == 3
    mutating = [m for m in stats.counts if not is_read_only(m) and m != "session.logout"]
    assert mutating == []
    assert len(sim.session().xenapi.host.get_all()) == 1


def test_member_login_follows_host_is_slave_to_master(pool3: SimServer) -> None:
    spec = sim_spec(pool3)
    x = connect(spec.pool, Secret(pool3.password), url=spec.pool.members[1])
    try:
        assert x.redirects == [pool3.hosts[0].address]
        assert x.url == f"https://{pool3.hosts[0].address}:{pool3.port}/"  # scheme, port kept
        assert len(x.call("host.get_all")) == 3
    finally:
        x.logout()


def test_planned_failover_and_eject(pool3: SimServer) -> None:
    spec = sim_spec(pool3)
    pw = Secret(pool3.password)
    stats = CallStats()
    plan = pool_failover(spec.pool, pw, to="host-3", dry_run=True, stats=stats)
    assert plan.changed and "designate host-3" in plan.actions[0]
    assert [m for m in stats.counts if not is_read_only(m) and m != "session.logout"] == []
    before = connect(spec.pool, pw)  # a session opened on host-1, kept across the move
    res = pool_failover(spec.pool, pw, to="host-3")
    assert res.changed and res.master == "host-3"
    try:  # its next call meets HOST_IS_SLAVE on host-1 and follows it to host-3
        assert len(before.call("host.get_all")) == 3
        assert before.redirects == [pool3.hosts[2].address]
    finally:
        before.logout()
    x = connect(spec.pool, pw)  # spec still names host-1: followed to host-3
    try:
        st = pool_status(x)
        assert st.master == "host-3"
        assert pool_failover(spec.pool, pw, to="host-3").changed is False
        with pytest.raises(PoolError, match="pool master"):
            pool_eject(x, "host-3")
        calls = x.stats.snapshot()
        assert pool_eject(x, "host-2", dry_run=True).changed
        new_calls = {m for m, n in x.stats.snapshot().items() if n != calls.get(m, 0)}
        assert [m for m in new_calls if not is_read_only(m)] == []
        assert len(x.call("host.get_all")) == 3
        res = pool_eject(x, "host-2")
        assert res.changed
        assert sorted(h.name for h in pool_status(x).hosts) == ["host-1", "host-3"]
        assert pool_eject(x, pool3.hosts[1].address).changed is False  # gone already
    finally:
        x.logout()


@pytest.mark.parametrize(("to", "new_master"), [(None, "host-2"), ("host-3", "host-3")])
def test_emergency_failover_restores_control(pool3: SimServer, to: str | None,
                                             new_master: str) -> None:
    spec = sim_spec(pool3)
    pw = Secret(pool3.password)
    with pytest.raises(PoolError, match="alive"):
        pool_failover(spec.pool, pw, emergency=True)
    pool3.kill_host("host-1")
    with pytest.raises(XapiConnectionError, match="failover --emergency"):
        connect(spec.pool, pw)
    runner = CliRunner()
    to_args = ["--to", to] if to else []
    out = runner.invoke(cli, [*cli_args(pool3), "pool", "failover", "--emergency", "--yes",
                              *to_args], env=cli_env(pool3))
    assert out.exit_code == 2, out.output
    assert "promote" in out.output
    x = connect(spec.pool, pw)  # host-1 is dead: a member answers and points to the new master
    try:
        st = pool_status(x)
        assert st.master == new_master
        live = {h.name: h.live for h in st.hosts}
        assert live == {"host-1": False, "host-2": True, "host-3": True}
        # the pool is usable again: a mutating call goes through
        pool_ref = x.call("pool.get_all")[0]
        x.call("pool.set_name_description", pool_ref, "recovered")
    finally:
        x.logout()


def test_tls_verification(sim: SimServer) -> None:
    pw = Secret(sim.password)
    fps = {h.address: sim.fingerprints[h.name] for h in sim.hosts}
    # no CA and no pin: the simulator's private CA is not trusted by the system store
    spec = sim_spec(sim, **{"pool.tls.ca_file": None})
    with pytest.raises(TLSError, match="not trusted"):
        connect(spec.pool, pw, url=spec.pool.master)
    # the right pin per host
    pins = ",".join(f"{a}={f}" for a, f in fps.items())
    spec = sim_spec(sim, **{"pool.tls.ca_file": None, "pool.tls.fingerprints": pins})
    connect(spec.pool, pw, url=spec.pool.master).logout()
    # host-2's pin used for host-1: refused before the password is sent
    wrong = f"{sim.hosts[0].address}={fps[sim.hosts[1].address]}"
    spec = sim_spec(sim, **{"pool.tls.ca_file": None, "pool.tls.fingerprints": wrong})
    stats = CallStats()
    with pytest.raises(TLSError, match="not pinned"):
        connect(spec.pool, pw, url=spec.pool.master, stats=stats)


def test_insecure_is_loud(sim: SimServer, capsys: Any) -> None:
    spec = sim_spec(sim, **{"pool.tls.ca_file": None, "pool.tls.insecure": True})
    connect(spec.pool, Secret(sim.password), url=spec.pool.master).logout()
    assert "TLS verification is OFF" in capsys.readouterr().err


def test_bad_password_is_one_clear_line(sim: SimServer) -> None:
    runner = CliRunner()
    env = {**cli_env(sim), "XENCTL_PASSWORD": "wrong-" + sim.password}
    out = runner.invoke(cli, [*cli_args(sim), "pool", "status"], env=env)
    assert out.exit_code == 1
    lines = [line for line in out.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("xenctl: error: authentication failed")
    assert sim.password not in out.output


def test_expired_session_is_renewed(sim: SimServer) -> None:
    import xmlrpc.client

    spec = sim_spec(sim)
    x = connect(spec.pool, Secret(sim.password), url=spec.pool.master)
    try:
        old = x.call("session.get_uuid", x.handle)
        # the server forgets the session (as xapi's GC does after 24 h idle)
        proxy = xmlrpc.client.ServerProxy(spec.pool.master, transport=sim.transport())
        assert proxy.session.logout(x.handle)["Status"] == "Success"
        proxy("close")()
        assert len(x.call("host.get_all")) == 1  # SESSION_INVALID -> re-login -> retried
        assert x.call("session.get_uuid", x.handle) != old
    finally:
        x.logout()


def test_member_of_another_pool_is_refused_clearly(make_sim: Any) -> None:
    sim = make_sim(hosts=4)
    # host-4 joins host-3 behind xenctl's back: host-3 is now the master of a pool of two
    s = sim.session("host-4")
    s.xenapi.pool.join(sim.hosts[2].address, sim.username, sim.password)
    spec = sim_spec(sim, **{"pool.members": [f"{h.address}:{sim.port}" for h in sim.hosts[1:3]]})
    with pytest.raises(PoolError, match="master of a pool of 2 hosts"):
        pool_create(spec.pool, Secret(sim.password))
    spec = sim_spec(sim, **{"pool.members": [f"{sim.hosts[3].address}:{sim.port}"]})
    with pytest.raises(PoolError, match="member of another pool"):
        pool_create(spec.pool, Secret(sim.password))


def test_password_prompt_is_hidden_on_a_terminal(sim: SimServer) -> None:
    """No password source configured and a terminal: xenctl prompts without echo."""
    import os
    import pty
    import select
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("XENCTL_", "XENSERVER_"))}
    env["XENCTL_CA_FILE"] = sim.ca_file
    argv = [sys.executable, "-m", "xenctl.cli", "--master", f"{sim.hosts[0].address}:{sim.port}",
            "pool", "status"]
    pid, fd = pty.fork()
    if pid == 0:  # child: a session with this pty as its controlling terminal
        os.execve(argv[0], argv, env)
    seen = b""
    sent = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break  # child closed the terminal
            if not chunk:
                break
            seen += chunk
            if not sent and b"Password for root@" in seen:
                os.write(fd, sim.password.encode() + b"\n")
                sent = True
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = seen.decode(errors="replace")
    assert sent, text
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "host-1" in text and "master" in text
    assert sim.password not in text  # not echoed, not printed
