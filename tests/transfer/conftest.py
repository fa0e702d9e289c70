"""Fixtures for the transfer tests: a PKI and daemons on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_helpers import node_config

from transfer import pki
from transfer.client import Credentials, client_ssl_context
from transfer.config import NodeAddr
from transfer.daemon import ServerThread


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue(d, "node", ips=["127.0.0.1"], dns=["localhost"])
    pki.issue(d, "workstation", client=True)
    pki.new_token(d / "token")
    return d


@pytest.fixture
def creds(pki_dir: Path) -> Credentials:
    return Credentials(
        client_ssl_context(str(pki_dir / "ca.crt")), (pki_dir / "token").read_text().strip()
    )


@pytest.fixture
def node(tmp_path: Path, pki_dir: Path) -> Iterator[tuple[ServerThread, NodeAddr]]:
    with ServerThread(node_config(tmp_path / "store", pki_dir)) as srv:
        yield srv, NodeAddr("127.0.0.1", srv.port)


@pytest.fixture
def plain_node(tmp_path: Path) -> Iterator[tuple[ServerThread, NodeAddr]]:
    with ServerThread(node_config(tmp_path / "plainstore", None, erl3d_port=0)) as srv:
        yield srv, NodeAddr("127.0.0.1", srv.port)
