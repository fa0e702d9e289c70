"""Fixtures for labnet tests: a lab per test, torn down even when the test fails."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from labnet import Lab


@pytest.fixture(autouse=True)
def _needs_root(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("lab") and os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces, veths, mounts)")


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    with Lab.create() as the_lab:
        yield the_lab
