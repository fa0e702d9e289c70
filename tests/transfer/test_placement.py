"""Rendezvous placement: deterministic, distinct replicas, even spread, minimal movement; and
the directory walk that lists what is placed."""

from __future__ import annotations

from collections import Counter

import pytest
from transfer_helpers import make_series

from transfer.client import LocalFile, assign, scan
from transfer.config import NodeAddr
from transfer.errors import ValidationError
from transfer.placement import place

NODES = [NodeAddr("10.213.5.11", 7370, f"node-{i:02d}") for i in range(1, 6)]
KEYS = [f"1.2.826.0.1.3680043.8.498.{i}" for i in range(360)]


def _place(key: str, nodes: list[NodeAddr], replicas: int = 1) -> list[NodeAddr]:
    return place(key, nodes, replicas, {id(n): n.key for n in nodes})


def test_deterministic_and_independent_of_node_order() -> None:
    for k in KEYS[:50]:
        assert _place(k, NODES, 2) == _place(k, list(reversed(NODES)), 2)


def test_replicas_are_distinct_and_capped() -> None:
    for k in KEYS[:50]:
        got = _place(k, NODES, 3)
        assert len(got) == 3 == len(set(got))
        assert _place(k, NODES, 3)[0] == _place(k, NODES, 1)[0]  # the first choice never moves
    assert len(_place(KEYS[0], NODES[:2], 5)) == 2
    with pytest.raises(ValueError):
        _place(KEYS[0], NODES, 0)


def test_360_slices_spread_about_evenly_over_5_nodes() -> None:
    counts = Counter(_place(k, NODES)[0].key for k in KEYS)
    assert len(counts) == 5 and sum(counts.values()) == 360
    assert min(counts.values()) >= 45 and max(counts.values()) <= 100  # 72 each on average


def test_adding_a_node_moves_only_what_lands_on_it() -> None:
    new = NodeAddr("10.213.5.16", 7370, "node-06")
    before = {k: _place(k, NODES)[0] for k in KEYS}
    after = {k: _place(k, [*NODES, new])[0] for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == new for k in moved)
    assert 20 <= len(moved) <= 110  # about 360/6


def test_uploader_places_by_sop_instance_uid(tmp_path: object) -> None:
    from pathlib import Path

    out = Path(str(tmp_path))
    make_series(out / "s", 10)
    files = scan(out / "s").files
    plan = assign(files, NODES, 2)
    for lf in files:
        holders = [n for n, lfs in plan.items() if lf in lfs]
        assert sorted(holders, key=lambda n: n.key) == sorted(_place(lf.sop, NODES, 2), key=lambda n: n.key)
    # A non-DICOM file is placed by its content hash.
    other = LocalFile(out / "x", "x", 1, "ab" * 32, "other")
    assert assign([other], NODES, 1)[_place("ab" * 32, NODES)[0]] == [other]


def test_walk_lists_regular_files_sorted_skips_hidden_and_linked_directories(tmp_path: object) -> None:
    import os
    from pathlib import Path

    from transfer.client import walk

    root = Path(str(tmp_path)) / "in"
    for rel in ("b.dcm", "a.dcm", "sub/z.dcm", "sub/deeper/y.dcm", "a-dir/x.dcm", ".hidden.dcm",
                ".git/obj", "sub/.cache/c"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    outside = Path(str(tmp_path)) / "outside"
    (outside / "o.dcm").parent.mkdir(parents=True)
    (outside / "o.dcm").write_bytes(b"o")
    os.symlink(outside, root / "linked-dir")  # not followed (as os.walk)
    os.symlink(outside / "o.dcm", root / "linked.dcm")  # a link to a file counts
    os.symlink(root / "missing", root / "dangling.dcm")  # nothing behind it: skipped
    got = walk(root)
    assert [name for _, name in got] == [
        "a.dcm", "b.dcm", "linked.dcm", "a-dir/x.dcm", "sub/z.dcm", "sub/deeper/y.dcm"]
    assert all(p == root / name for p, name in got)
    assert walk(root / "a.dcm") == [(root / "a.dcm", "a.dcm")]
    with pytest.raises(ValidationError, match="no such directory"):
        walk(root / "nope")
