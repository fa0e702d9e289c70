"""A lab (1 workstation + 3 nodes) deployed once per module with site.yml, torn down after."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from labdeploy import N_NODES, Deployed, lab_inventory, write_inventory  # noqa: E402


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    from labnet import Lab
    from xenctl.deploy import build_wheelhouse, run_site

    state = tmp_path_factory.mktemp("deploy-state")
    with Lab.create() as lab:
        ws, *nodes = lab.add_hosts(["workstation", *[f"node-{i:02d}" for i in range(1, N_NODES + 1)]])
        # the last node runs the pidfile supervisor's setpriv variant (the RedHat family's;
        # Debian's start-stop-daemon on the others): both supervisors deployed and restarted
        setpriv = {nodes[-1].name: {"transfer_node_supervisor": "setpriv"}}
        inv = write_inventory(lab_inventory(lab, ws, nodes, setpriv), state / "hosts.yml")
        # one wheelhouse for every run of the module: the checkout may change meanwhile
        wh = build_wheelhouse(state / "wheelhouse")
        progress: list[str] = []
        first = run_site(inv, state_dir=state, wheelhouse=wh, progress=progress.append)
        yield Deployed(lab, ws, nodes, inv, state, wh, first, progress)
