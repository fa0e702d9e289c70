"""The one exception root of labnet."""

from __future__ import annotations


class LabError(Exception):
    """Anything labnet could not do: a failed ip/tc command, no free subnet, a host that did not boot."""
