"""The workstation: the client installed, its node list equal to the inventory's group `nodes`."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

pytestmark = pytest.mark.infra
testinfra_hosts = ["ansible://workstation"]


def test_client_is_installed(host: Any) -> None:
    assert host.run("/opt/medstream/venv/bin/transfer --help").rc == 0


def test_node_list_matches_the_inventory(host: Any, inventory_runner: Any,
                                          node_names: list[str]) -> None:
    cfg = tomllib.loads(host.file("/etc/medstream/transfer.toml").content_string)
    listed = [(n["name"], n["host"], n["port"]) for n in cfg.get("nodes", [])]
    want = []
    for name in node_names:
        hv = inventory_runner.get_variables(name)
        want.append((hv.get("medstream_node_name", name), hv.get("ansible_host", name),
                     int(hv.get("transfer_node_port", 7370))))
    assert sorted(listed) == sorted(want)
    assert len(listed) == len(node_names) > 0


def test_client_trusts_the_ca_and_holds_the_token(host: Any) -> None:
    cfg = tomllib.loads(host.file("/etc/medstream/transfer.toml").content_string)["transfer"]
    ca = host.file(cfg["ca_file"])
    assert ca.is_file and ca.mode == 0o644
    assert "BEGIN CERTIFICATE" in ca.content_string
    token = host.file(cfg["token_file"])
    assert (token.user, token.mode) == ("root", 0o600)
    assert len(token.content_string.strip()) >= 16
