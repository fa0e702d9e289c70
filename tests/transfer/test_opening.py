"""How the uploader opens its connections: a few at a time across all nodes, and not at all
once the files they were opened for have gone on other connections."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from transfer_helpers import MinimalNode, make_series

from transfer import client
from transfer.client import Credentials, Progress, assign, scan, upload_files
from transfer.config import NodeAddr


def test_connections_open_a_few_at_a_time_across_all_nodes(tmp_path: Path) -> None:
    """Six nodes, two connections each: twelve handshakes wanted at once, but never more than
    OPENING_MAX are under way together, and every file still arrives once."""
    make_series(tmp_path / "s", 24, rows=32, cols=32, seed=21)
    files = scan(tmp_path / "s").files
    seen: dict[str, int] = {}
    stored: list[str] = []

    async def main() -> dict[str, object]:
        servers = [
            await asyncio.start_server(MinimalNode(seen, stored, delay=0.05).handle, "127.0.0.1", 0)
            for _ in range(6)
        ]
        nodes = [
            NodeAddr("127.0.0.1", s.sockets[0].getsockname()[1], f"n{i}")
            for i, s in enumerate(servers)
        ]
        try:
            async with asyncio.timeout(30):
                rep = await upload_files(
                    files, nodes, Credentials.plaintext(), connections_per_node=2
                )
        finally:
            for s in servers:
                s.close()
        return rep.as_dict()

    rep = asyncio.run(main())
    assert rep["ok"], rep["failed"]
    assert sorted(stored) == sorted(lf.sop for lf in files)
    assert seen["accepted"] >= 6  # every node got at least one connection
    assert seen["most_opening"] == client.OPENING_MAX


def test_a_connection_no_longer_wanted_when_its_turn_comes_is_not_opened(
    tmp_path: Path,
) -> None:
    """A connection waiting for its turn to open (here: the only turn is held) whose files have
    meanwhile gone on other connections gives its turn up without connecting."""
    make_series(tmp_path / "s", 1, rows=32, cols=32, seed=22)
    files = scan(tmp_path / "s").files
    seen: dict[str, int] = {}

    async def main() -> tuple[object, int]:
        server = await asyncio.start_server(MinimalNode(seen, []).handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        gate = asyncio.Semaphore(1)
        wanted = [True]
        with ThreadPoolExecutor(1) as ex:
            up = client._Uploader(
                NodeAddr("127.0.0.1", port, "n"),
                files,
                Credentials.plaintext(),
                connections=1,
                compression="none",
                retries=0,
                progress=Progress(1, files[0].size, enabled=False),
                failed=[],
                resume=False,
                executor=ex,
                opening=gate,
            )
            async with server, asyncio.timeout(10):
                await gate.acquire()  # another connection is being opened
                task = asyncio.create_task(up._open(lambda: wanted[0]))
                await asyncio.sleep(0.05)
                assert not task.done() and seen["accepted"] == 0  # waits its turn
                wanted[0] = False  # meanwhile its files went elsewhere
                gate.release()
                got = await task
                await asyncio.sleep(0.05)  # a connection, had one been made, is accepted now
                return got, seen["accepted"]

    got, accepted = asyncio.run(main())
    assert got is None and accepted == 0


def test_hand_overs_stop_at_one_connection_per_queued_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four nodes finish at once while the fifth still has two files queued behind a slow
    ACK: only two of their connections move there (one per queued file), not all four. The
    moved ones take 0.3 s to be welcomed, so every hand-over is decided while they are still
    on their way. (The opening gate is widened here so that it does not hide the count.)"""
    monkeypatch.setattr(client, "OPENING_MAX", 16)
    make_series(tmp_path / "s", 40, rows=384, cols=384, seed=23)  # ~295 KB a file
    sc = scan(tmp_path / "s")
    seen: dict[str, int] = {}
    stored: list[str] = []

    async def main() -> tuple[dict[str, object], list[int]]:
        busy = MinimalNode(seen, stored, later=0.3, ack_delay=0.5)
        nodes_ = [busy] + [MinimalNode(seen, stored) for _ in range(4)]
        servers = [await asyncio.start_server(n.handle, "127.0.0.1", 0) for n in nodes_]
        addrs = [
            NodeAddr("127.0.0.1", srv.sockets[0].getsockname()[1], f"n{i}")
            for i, srv in enumerate(servers)
        ]
        plan = assign(sc.files, addrs, 1)
        files = plan[addrs[0]][:3] + [plan[a][0] for a in addrs[1:]]
        try:
            async with asyncio.timeout(30):
                rep = await upload_files(
                    files, addrs, Credentials.plaintext(), connections_per_node=1, resume=False
                )
        finally:
            for srv in servers:
                srv.close()
        return rep.as_dict(), [n.accepted for n in nodes_]

    rep, accepted = asyncio.run(main())
    assert rep["ok"], rep["failed"]
    assert len(stored) == 7
    assert accepted == [3, 1, 1, 1, 1]
