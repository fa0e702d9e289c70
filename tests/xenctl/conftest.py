"""Fixtures for xenctl: a running xapisim spoken to through the real XenAPI SDK over HTTPS."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from xenctl_helpers import sim_spec

from xapisim import SimConfig, SimServer
from xenctl.pool import pool_create
from xenctl.spec import GiB, Secret


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimServer]]:
    sims: list[SimServer] = []

    def make(**cfg: Any) -> SimServer:
        cfg.setdefault("hosts", 3)
        cfg.setdefault("sync_interval", 1.0)
        sim = SimServer(SimConfig(**cfg)).start()
        sims.append(sim)
        return sim

    yield make
    for s in sims:
        s.stop()


@pytest.fixture
def sim(make_sim: Callable[..., SimServer]) -> SimServer:
    """Three standalone hosts with 16 GiB each (room for 30 one-GiB nodes)."""
    return make_sim(host_memory=16 * GiB)


@pytest.fixture
def pool3(sim: SimServer) -> SimServer:
    """``sim`` formed into a pool of three by xenctl."""
    spec = sim_spec(sim)
    pool_create(spec.pool, Secret(sim.password))
    return sim
