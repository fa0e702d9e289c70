"""Fixtures: a running simulator and real XenAPI sessions to it (never a mock of the SDK)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from xapisim import SimConfig, SimServer


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(hosts=3, sync_interval=0.0, seed=1)) as s:
        yield s


@pytest.fixture
def xapi(sim: SimServer) -> Iterator[Any]:
    session = sim.session("host-1")
    try:
        yield session.xenapi
    finally:
        try:
            session.xenapi.session.logout()
        except Exception:
            pass




@pytest.fixture(autouse=True)
def no_simulator_bugs() -> Iterator[None]:
    """Every test also proves the simulator raised no error of the wrong shape and hit no bug."""
    from xapisim.dispatch import Dispatcher
    Dispatcher.bugs.clear()
    yield
    assert Dispatcher.bugs == []
