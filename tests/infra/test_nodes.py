"""Every node: transferd listening as the service user, secrets and storage with the right modes."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.infra
testinfra_hosts = ["ansible://nodes"]

USER = "medstream"
PORT = 7370


def test_transferd_listens(host: Any) -> None:
    assert host.socket(f"tcp://0.0.0.0:{PORT}").is_listening


def test_transferd_runs_as_the_service_user(host: Any) -> None:
    procs = [p for p in host.process.filter(user=USER) if "transferd" in p.args]
    assert procs, "no transferd process owned by the service user"
    assert not [p for p in host.process.filter(user="root") if "bin/transferd" in p.args]


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
])
def test_file_owner_and_mode(host: Any, path: str, owner: str, group: str, mode: int) -> None:
    f = host.file(path)
    assert f.exists, path
    assert (f.user, f.group, f.mode) == (owner, group, mode)


def test_no_ca_key_on_the_node(host: Any) -> None:
    assert host.run("find /etc/medstream /opt/medstream -name 'ca.key'").stdout.strip() == ""


def test_storage_root_writable_only_by_the_service_user(host: Any) -> None:
    probe = "test -w /srv/medstream && test -x /srv/medstream"
    assert host.run(f"runuser -u {USER} -- sh -c '{probe}'").rc == 0
    assert host.run(f"runuser -u nobody -- sh -c '{probe}'").rc != 0
    assert host.run("runuser -u nobody -- ls /srv/medstream").rc != 0


def test_config_points_at_the_deployed_material(host: Any) -> None:
    import tomllib

    cfg = tomllib.loads(host.file("/etc/medstream/transferd.toml").content_string)["transferd"]
    assert cfg["port"] == PORT
    assert cfg["storage_root"] == "/srv/medstream"
    assert cfg["insecure_plaintext"] is False
    for key in ("tls_cert", "tls_key", "token_file"):
        assert host.file(cfg[key]).is_file, key
