"""The uploader's memory bound: one buffer pool shared by every node and connection."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from transfer_helpers import MinimalNode, make_series, node_config

from transfer.client import BufferPool, Credentials, LocalFile, fetch, scan, upload_files
from transfer.config import NodeAddr
from transfer.daemon import ServerThread


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_budget_is_shared_by_all_nodes_and_connections_and_never_exceeded(
    tmp_path: Path, pki_dir: Path, creds: Credentials, compression: str
) -> None:
    # 30 files of ~32 KB, read in 8 KiB chunks (4+ chunks each), to 3 nodes x 4 connections
    # (12 connections) through a pool of only 3 buffers: they must queue for buffers, and the
    # pool must never hand out more than its budget.
    files = make_series(tmp_path / "s", 30, rows=128, cols=128, seed=7)
    sc = scan(tmp_path / "s")
    servers = [ServerThread(node_config(tmp_path / f"n{i}", pki_dir)) for i in range(3)]
    for srv in servers:
        srv.start()
    try:
        nodes = [NodeAddr("127.0.0.1", srv.port, f"n{i}") for i, srv in enumerate(servers)]

        async def go() -> tuple[BufferPool, dict[str, object]]:
            pool = BufferPool(budget=3 * 8192, chunk=8192)
            rep = await upload_files(
                sc.files, nodes, creds, connections_per_node=4, compression=compression, pool=pool
            )
            return pool, rep.as_dict()

        pool, rep = asyncio.run(go())
        assert rep["ok"], rep
        assert rep["total"] == {  # type: ignore[comparison-overlap]
            "files": 30,
            "already": 0,
            "failed": 0,
            "rejected": 0,
            "bytes": sum(f.stat().st_size for f in files),
            "mb_per_s": rep["total"]["mb_per_s"],  # type: ignore[index]
        }
        assert pool.slots == 3
        assert pool.peak == 3  # the budget was the limit (12 connections wanted more) ...
        assert pool.allocated <= 3  # ... never exceeded, and buffers were reused
        assert pool.in_use == 0  # every buffer came back
        assert rep["memory"] == {"budget": 3 * 8192, "peak": 3 * 8192}
        assert all(n["files"] > 0 for n in rep["nodes"])  # type: ignore[attr-defined]
        # Byte-identical on the nodes (chunks framed in place, buffers reused: no mix-ups).
        got = asyncio.run(fetch(nodes, creds, tmp_path / "out"))
        assert sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in got) == sorted(
            hashlib.sha256(p.read_bytes()).hexdigest() for p in files
        )
    finally:
        for srv in servers:
            srv.stop()


def test_a_file_that_shrinks_after_the_scan_fails_alone_and_returns_its_buffers(
    tmp_path: Path, plain_node: tuple[ServerThread, NodeAddr]
) -> None:
    _, addr = plain_node
    make_series(tmp_path / "s", 6, rows=64, cols=64, seed=8)
    sc = scan(tmp_path / "s")
    # One shrinks mid-body (after two 2 KiB chunks went out), one within its first chunk.
    victim, early = sc.files[2], sc.files[4]
    victim.path.write_bytes(victim.path.read_bytes()[:5000])
    early.path.write_bytes(early.path.read_bytes()[:1000])

    async def go() -> tuple[BufferPool, dict[str, object]]:
        pool = BufferPool(budget=2 * 2048, chunk=2048)
        rep = await upload_files(
            sc.files, [addr], Credentials.plaintext(), connections_per_node=2, pool=pool
        )
        return pool, rep.as_dict()

    pool, rep = asyncio.run(go())
    assert rep["total"]["files"] == 4  # type: ignore[index]
    failed = {f["name"]: f["reason"] for f in rep["failed"]}  # type: ignore[attr-defined]
    assert sorted(failed) == sorted([victim.name, early.name])
    assert all("changed since it was scanned" in r for r in failed.values())
    assert pool.in_use == 0


@pytest.mark.parametrize("chunk", [2048, 1 << 20])  # several chunks a file, or one
def test_a_file_removed_after_the_scan_fails_alone_and_returns_its_buffers(
    tmp_path: Path, plain_node: tuple[ServerThread, NodeAddr], chunk: int
) -> None:
    _, addr = plain_node
    make_series(tmp_path / "s", 4, rows=64, cols=64, seed=9)
    sc = scan(tmp_path / "s")
    gone = sc.files[1]
    gone.path.unlink()

    async def go() -> tuple[BufferPool, dict[str, object]]:
        pool = BufferPool(budget=2 * chunk, chunk=chunk)
        rep = await upload_files(
            sc.files, [addr], Credentials.plaintext(), connections_per_node=2, pool=pool
        )
        return pool, rep.as_dict()

    pool, rep = asyncio.run(go())
    assert rep["total"]["files"] == 3  # type: ignore[index]
    failed = {f["name"]: f["reason"] for f in rep["failed"]}  # type: ignore[attr-defined]
    assert failed == {gone.name: "cannot read: No such file or directory"}
    assert pool.in_use == 0


def test_files_are_sent_while_the_scan_is_still_running(
    tmp_path: Path, plain_node: tuple[ServerThread, NodeAddr]
) -> None:
    """The first file must be stored before the feed (the scan) adds the second: if the
    upload waited for the whole scan, the wait below would time out."""
    from transfer.client import NodeSession

    _, addr = plain_node
    make_series(tmp_path / "s", 3, rows=32, cols=32, seed=9)
    sc = scan(tmp_path / "s")
    creds = Credentials.plaintext()
    seen_stored: list[int] = []

    async def feed(add: Callable[[LocalFile], None]) -> None:
        add(sc.files[0])
        async with NodeSession(addr, creds) as s:
            for _ in range(200):  # bounded: at most ~10 s
                held = await s.call(
                    "have", items=[{"sop": sc.files[0].sop, "sha256": sc.files[0].sha256}]
                )
                if held[0]:
                    break
                await asyncio.sleep(0.05)
            seen_stored.append(int(held[0]))
        for lf in sc.files[1:]:
            add(lf)

    rep = asyncio.run(upload_files([], [addr], creds, feed=feed)).as_dict()
    assert seen_stored == [1]
    assert rep["ok"] and rep["total"]["files"] == 3  # type: ignore[index]
    # A re-run through the streaming path sends nothing again (resume checks per batch).
    again = asyncio.run(upload_files([], [addr], creds, feed=_adder(sc.files))).as_dict()
    assert again["total"]["files"] == 0 and again["total"]["already"] == 3  # type: ignore[index]


def _adder(files: list[LocalFile]) -> Callable[[Callable[[LocalFile], None]], Awaitable[None]]:
    async def feed(add: Callable[[LocalFile], None]) -> None:
        for lf in files:
            add(lf)
            await asyncio.sleep(0)

    return feed


def test_an_early_connection_dropped_while_idle_is_not_a_failure(tmp_path: Path) -> None:
    """Upload connections open as soon as files are assigned, ahead of the resume check. Here
    that check finds the first files stored already, the scan then pauses past the node's idle
    timeout (the node drops the idle connection), and new files follow: with no retries
    allowed, they must still be stored, over a connection opened once they are queued."""
    srv = ServerThread(node_config(tmp_path / "n", None, idle_timeout=0.5)).start()
    try:
        addr = NodeAddr("127.0.0.1", srv.port, "n")
        creds = Credentials.plaintext()
        make_series(tmp_path / "s", 6, rows=32, cols=32, seed=11)
        sc = scan(tmp_path / "s")
        first = asyncio.run(upload_files(sc.files[:3], [addr], creds)).as_dict()
        assert first["ok"] and first["total"]["files"] == 3  # type: ignore[index]

        async def feed(add: Callable[[LocalFile], None]) -> None:
            for lf in sc.files[:3]:
                add(lf)
            await asyncio.sleep(1.5)  # longer than the node's idle timeout
            for lf in sc.files[3:]:
                add(lf)

        served = srv.server.served if srv.server else 0
        rep = asyncio.run(
            upload_files([], [addr], creds, feed=feed, retries=0, connections_per_node=1)
        ).as_dict()
        assert rep["ok"], rep["failed"]
        assert rep["total"]["files"] == 3 and rep["total"]["already"] == 3  # type: ignore[index]
        # The early connection (it carried the first resume check, then was dropped while idle)
        # and the one that carried the second check and sent the files.
        assert srv.server is not None and srv.server.served - served == 2
    finally:
        srv.stop()


def test_a_resume_check_lost_with_its_connection_is_asked_again(tmp_path: Path) -> None:
    """The resume check rides on an upload connection. A node (here a minimal one, written
    with the protocol's own state machine) that drops the connection carrying the first check
    before answering gets asked again on the next: every file is still sent, once."""
    make_series(tmp_path / "s", 4, rows=32, cols=32, seed=12)
    files = scan(tmp_path / "s").files
    seen: dict[str, int] = {}
    stored: list[str] = []
    node = MinimalNode(seen, stored, drop_checks=1)

    async def main() -> dict[str, object]:
        server = await asyncio.start_server(node.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, asyncio.timeout(30):
            rep = await upload_files(
                files,
                [NodeAddr("127.0.0.1", port, "n")],
                Credentials.plaintext(),
                connections_per_node=1,
            )
        return rep.as_dict()

    rep = asyncio.run(main())
    assert rep["ok"], rep["failed"]
    assert rep["total"]["files"] == 4 and rep["total"]["already"] == 0  # type: ignore[index]
    assert seen["checks"] == 2 and seen["accepted"] >= 2
    assert sorted(stored) == sorted(lf.sop for lf in files)
