"""testinfra checks of a deployed cloud, on the same inventory Ansible used.

    pytest tests/infra --ansible-inventory inventory/hosts.yml      # or any inventory file

Without ``--ansible-inventory`` (and without ``$MEDSTREAM_INFRA_INVENTORY``) the folder is not
collected: a plain ``pytest`` run must not reach for hosts that may not exist. testinfra's
``ansible://`` backend reads each host's ``ansible_host``, user, key and ssh args from the
inventory and talks plain ssh (fast), so lab hosts work through ``ansible_ssh_common_args``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


def _inventory(config: pytest.Config) -> str | None:
    opt = config.getoption("ansible_inventory", default=None)
    return str(opt) if opt else os.environ.get("MEDSTREAM_INFRA_INVENTORY") or None


def pytest_configure(config: pytest.Config) -> None:
    inv = _inventory(config)
    if inv and not config.getoption("ansible_inventory", default=None):
        config.option.ansible_inventory = inv


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name.startswith("test_") and _inventory(config) is None:
        return True
    return None


@pytest.fixture(scope="session")
def inventory_runner(pytestconfig: pytest.Config) -> Any:
    from testinfra.utils.ansible_runner import AnsibleRunner

    return AnsibleRunner(_inventory(pytestconfig))


@pytest.fixture(scope="session")
def node_names(inventory_runner: Any) -> list[str]:
    return list(inventory_runner.get_hosts("nodes"))
