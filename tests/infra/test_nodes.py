"""Every node: transferd listening as the service user, secrets and storage with the right modes."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.infra
testinfra_hosts = ["ansible://nodes"]

USER = "medstream"
PORT = 7370
PIDFILE = "/run/medstream/transferd.pid"


def port_of(host: Any, inventory_runner: Any) -> int:
    """transferd's port for this host: its inventory's transfer_node_port, else the default."""
    hv = inventory_runner.get_variables(host.backend.host)
    return int(hv.get("transfer_node_port", hv.get("medstream_port", PORT)))


def test_transferd_listens(host: Any, inventory_runner: Any) -> None:
    assert host.socket(f"tcp://0.0.0.0:{port_of(host, inventory_runner)}").is_listening


def test_service_is_supervised(host: Any) -> None:
    """systemd where it is PID 1 (enabled, hardened unit), else the pidfile names the daemon."""
    if host.file("/run/systemd/system").is_directory:
        svc = host.service("transferd")
        assert svc.is_running and svc.is_enabled
        props = dict(line.split("=", 1) for line in host.check_output(
            "systemctl show transferd -p User -p NoNewPrivileges -p ProtectSystem -p Restart "
            "-p ReadWritePaths -p UMask").splitlines() if "=" in line)
        assert props["User"] == USER and props["NoNewPrivileges"] == "yes"
        assert props["ProtectSystem"] in ("strict", "full") and props["Restart"] == "on-failure"
        assert "/srv/medstream" in props.get("ReadWritePaths", "/srv/medstream")
        assert props["UMask"] == "0027"
    else:
        pid = int(host.file(PIDFILE).content_string.strip())
        proc = host.process.get(pid=pid)
        assert proc.user == USER and "bin/transferd" in proc.args


def test_transferd_runs_as_the_service_user(host: Any) -> None:
    procs = [p for p in host.process.filter(user=USER) if "transferd" in p.args]
    assert procs, "no transferd process owned by the service user"
    # No copy of the deployed daemon runs as root. Matched by the deployed executable's path:
    # lab hosts share the machine's PID namespace, so a transferd that a developer or a
    # benchmark runs from elsewhere is visible here too and is not this host's.
    exes = {a for p in procs for a in p.args.split() if a.endswith("bin/transferd")}
    assert exes, procs
    assert not [p for p in host.process.filter(user="root") if exes & set(p.args.split())]


def test_service_user_cannot_log_in(host: Any) -> None:
    user = host.user(USER)
    assert user.exists
    assert user.shell.endswith("nologin")


@pytest.mark.parametrize(("path", "owner", "group", "mode"), [
    ("/etc/medstream/token", "root", USER, 0o640),
    ("/etc/medstream/tls/node.key", "root", USER, 0o640),
    ("/etc/medstream/tls/node.crt", "root", "root", 0o644),
    ("/etc/medstream/tls/ca.crt", "root", "root", 0o644),
    ("/etc/medstream/transferd.toml", "root", USER, 0o640),
    ("/etc/medstream/tls", "root", USER, 0o750),
    ("/srv/medstream", USER, USER, 0o750),
    ("/var/log/medstream", USER, USER, 0o750),
])
def test_file_owner_and_mode(host: Any, path: str, owner: str, group: str, mode: int) -> None:
    f = host.file(path)
    assert f.exists, path
    assert (f.user, f.group, f.mode) == (owner, group, mode)


def test_stored_studies_are_not_world_accessible(host: Any) -> None:
    # only the service user writes; the umask (0027) keeps studies away from other users
    assert host.run("find /srv/medstream -perm /o=rwx -o ! -user " + USER).stdout.strip() == ""


def test_no_ca_key_on_the_node(host: Any) -> None:
    assert host.run("find /etc/medstream /opt/medstream -name 'ca.key'").stdout.strip() == ""


def test_storage_root_writable_only_by_the_service_user(host: Any) -> None:
    probe = "test -w /srv/medstream && test -x /srv/medstream"
    assert host.run(f"runuser -u {USER} -- sh -c '{probe}'").rc == 0
    assert host.run(f"runuser -u nobody -- sh -c '{probe}'").rc != 0
    assert host.run("runuser -u nobody -- ls /srv/medstream").rc != 0


def test_config_points_at_the_deployed_material(host: Any, inventory_runner: Any) -> None:
    import tomllib

    cfg = tomllib.loads(host.file("/etc/medstream/transferd.toml").content_string)["transferd"]
    assert cfg["port"] == port_of(host, inventory_runner)
    assert cfg["storage_root"] == "/srv/medstream"
    assert cfg["insecure_plaintext"] is False
    for key in ("tls_cert", "tls_key", "token_file"):
        assert host.file(cfg[key]).is_file, key
