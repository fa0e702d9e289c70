"""How the uploader opens its connections: a few at a time across all nodes, and not at all
once the files they were opened for have gone on other connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from transfer_helpers import MinimalNode, make_series

from transfer import client
from transfer.client import Credentials, LocalFile, Progress, assign, scan, upload_files
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


def test_a_nodes_first_connection_opens_alone_and_sends_a_file_before_the_others_open(
    tmp_path: Path,
) -> None:
    """One node, four connections: the others wait for the lead's first file (their handshakes
    would slow the lead's), then open and share the rest; everything arrives once."""
    make_series(tmp_path / "s", 40, rows=32, cols=32, seed=23)
    files = scan(tmp_path / "s").files
    seen: dict[str, int] = {}
    stored: list[str] = []

    async def main() -> dict[str, object]:
        node = MinimalNode(seen, stored, delay=0.02, ack_delay=0.01)
        server = await asyncio.start_server(node.handle, "127.0.0.1", 0)
        addr = NodeAddr("127.0.0.1", server.sockets[0].getsockname()[1], "n0")
        try:
            async with asyncio.timeout(30):
                rep = await upload_files(
                    files, [addr], Credentials.plaintext(), connections_per_node=4
                )
        finally:
            server.close()
        return rep.as_dict()

    rep = asyncio.run(main())
    assert rep["ok"], rep["failed"]
    assert sorted(stored) == sorted(lf.sop for lf in files)
    assert seen["accepted_at_first_file"] == 1
    assert seen["accepted"] == 4  # and then the other three


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


async def _upload_one_connection_each(
    nodes: list[MinimalNode],
    files: list[LocalFile],
    pick: Callable[[list[list[LocalFile]]], list[LocalFile]],
    socks: dict[int, socket.socket] | None = None,
) -> tuple[dict[str, object], list[int]]:
    """Serve each MinimalNode on loopback (on a given listening socket where ``socks`` has one),
    place ``files`` on them, upload what ``pick`` takes from each node's share over one
    connection per node (no resume check), and return the report and each node's accepted
    connections."""
    servers = [
        await asyncio.start_server(n.handle, sock=socks[i], limit=16384)
        if socks and i in socks
        else await asyncio.start_server(n.handle, "127.0.0.1", 0)
        for i, n in enumerate(nodes)
    ]
    addrs = [
        NodeAddr("127.0.0.1", srv.sockets[0].getsockname()[1], f"n{i + 1}")
        for i, srv in enumerate(servers)
    ]
    plan = assign(files, addrs, 1)
    try:
        async with asyncio.timeout(30):
            rep = await upload_files(
                pick([plan[a] for a in addrs]),
                addrs,
                Credentials.plaintext(),
                connections_per_node=1,
                resume=False,
            )
    finally:
        for srv in servers:
            srv.close()
    return rep.as_dict(), [n.accepted for n in nodes]


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
    busy = MinimalNode(seen, stored, later=0.3, ack_delay=0.5)
    nodes = [busy] + [MinimalNode(seen, stored) for _ in range(4)]
    rep, accepted = asyncio.run(
        _upload_one_connection_each(
            nodes, sc.files, lambda shares: shares[0][:3] + [s[0] for s in shares[1:]]
        )
    )
    assert rep["ok"], rep["failed"]
    assert len(stored) == 7
    assert accepted == [3, 1, 1, 1, 1]


def test_a_slow_connection_takes_its_next_file_as_the_last_one_drains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a connection too slow for the commitment horizon, the COMMIT_MIN floor alone would
    take a second 247 KB file while most of the first is still to be sent. The uploader takes
    it once what the node's TCP has not acknowledged is below DRAIN_MIN: every FILE after the
    first goes out with less than that outstanding, and still before the previous file's ACK
    (the socket never runs dry). The node reads 0.5 MB/s, and at most about 64 KB wait unread in
    its receive buffer and its stream reader (here, without the rule, FILE 2 went out with
    183 KB outstanding)."""
    make_series(tmp_path / "s", 4, rows=320, cols=384, seed=24)  # ~247 KB a file
    assert all(f.stat().st_size < client.COMMIT_MIN for f in (tmp_path / "s").iterdir())
    files = scan(tmp_path / "s").files
    events: list[tuple[str, int]] = []
    send_header, done = client._Uploader._send_header, client._Uploader._done

    def header(self: client._Uploader, conn: Any, wire: Any, *a: Any) -> None:
        drain = wire.backlog()
        assert drain is not None  # Linux: TCP_INFO
        events.append(("FILE", drain[0]))
        send_header(self, conn, wire, *a)

    def acked(self: client._Uploader, *a: Any) -> None:
        events.append(("ACK", 0))
        done(self, *a)

    monkeypatch.setattr(client._Uploader, "_send_header", header)
    monkeypatch.setattr(client._Uploader, "_done", acked)
    seen: dict[str, int] = {}
    stored: list[str] = []

    async def main() -> dict[str, object]:
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # inherited on accept
        lsock.bind(("127.0.0.1", 0))
        server = await asyncio.start_server(
            MinimalNode(seen, stored, read_rate=5e5).handle, sock=lsock, limit=16384
        )
        addr = NodeAddr("127.0.0.1", lsock.getsockname()[1], "n")
        async with server, asyncio.timeout(30):
            rep = await upload_files(
                files, [addr], Credentials.plaintext(), connections_per_node=1, resume=False
            )
        return rep.as_dict()

    rep = asyncio.run(main())
    assert rep["ok"], rep["failed"]
    assert len(stored) == 4
    kinds = [k for k, _ in events]
    assert kinds.count("FILE") == 4 and kinds[-1] == "ACK"
    later = [left for k, left in events[1:] if k == "FILE"]
    assert all(left < client.DRAIN_MIN for left in later), events
    # Pipelined still: each file after the first went out before its predecessor's ACK.
    assert kinds[:2] == ["FILE", "FILE"] and kinds[1:7:2] == ["FILE"] * 3, kinds


@pytest.mark.parametrize("by_rate", [True, False])
def test_a_slow_nodes_last_file_goes_on_a_finished_nodes_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by_rate: bool
) -> None:
    """Node n1 reads 0.25 MB/s (a slow flow) and has three files of ~247 KB, less than
    HANDOVER_MIN_BYTES each; n2 has one file, acknowledged after 1.3 s. By then n1 has stored
    its first file, is sending its second, and has one queued: a second's worth at its rate,
    so n2's connection moves to n1 and sends it (n1 accepts two connections). With the byte
    floor alone (the time rule switched off), one file is never enough and n1's last file
    waits behind its second on the one connection."""
    if not by_rate:
        monkeypatch.setattr(client, "HANDOVER_MIN_SECONDS", float("inf"))
    make_series(tmp_path / "s", 12, rows=320, cols=384, seed=25)
    sc = scan(tmp_path / "s")
    assert all(lf.size < client.HANDOVER_MIN_BYTES for lf in sc.files)
    seen: dict[str, int] = {}
    stored: list[str] = []

    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # inherited on accept
    lsock.bind(("127.0.0.1", 0))
    slow = MinimalNode(seen, stored, read_rate=2.5e5)
    quick = MinimalNode(seen, stored, ack_delay=1.3)
    rep, accepted = asyncio.run(
        _upload_one_connection_each(
            [slow, quick], sc.files, lambda shares: shares[0][:3] + shares[1][:1], {0: lsock}
        )
    )
    assert rep["ok"], rep["failed"]
    assert len(stored) == 4
    assert accepted == ([2, 1] if by_rate else [1, 1])


@pytest.mark.parametrize("tls", [None, "TLSv1_2", "TLSv1_3"])
def test_the_wire_counts_what_the_peer_has_not_received_yet(
    tls: str | None, pki_dir: Path, tmp_path: Path
) -> None:
    """``_Wire.backlog`` is what was written minus what the peer's TCP acknowledged: 0 once a
    peer has read everything, TLS records included (22 bytes each in 1.3, 29 in 1.2), and
    most of what it has not read while it reads nothing (through a 16 KB receive buffer and
    a 16 KB stream reader limit; asyncio's TLS layer still reads up to about 512 KB ahead)."""
    from transfer.config import DaemonConfig
    from transfer.daemon import server_ssl_context

    got = asyncio.Queue[int]()
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        n = 0
        while data := await reader.read(1 << 16):
            n += len(data)
            if n >= total:
                await got.put(n)
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()

    sizes = [100, 16384, 16385, 2_000_000, 7]  # one record, exactly one, two, many, a tiny one
    total = sum(sizes)

    async def main() -> tuple[tuple[int, float] | None, tuple[int, float] | None, str | None]:
        sctx = cctx = None
        if tls is not None:
            cfg = DaemonConfig(
                tls_cert=str(pki_dir / "node.crt"), tls_key=str(pki_dir / "node.key")
            )
            sctx = server_ssl_context(cfg)
            sctx.maximum_version = getattr(ssl.TLSVersion, tls)
            cctx = client.client_ssl_context(str(pki_dir / "ca.crt"))
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # inherited on accept
        lsock.bind(("127.0.0.1", 0))
        server = await asyncio.start_server(handle, sock=lsock, ssl=sctx, limit=16384)
        port = lsock.getsockname()[1]
        async with server, asyncio.timeout(10):
            _, w = await asyncio.open_connection("127.0.0.1", port, ssl=cctx)
            wire = client._Wire(w)
            for n in sizes:
                wire.write(bytes(n))
            await wire.drain()
            await asyncio.sleep(0.2)
            unread = wire.backlog()  # the peer reads nothing yet: its buffers fill, then stop
            release.set()
            assert await got.get() == total
            await asyncio.sleep(0.1)  # the last TCP ACK
            done = wire.backlog()
            version = w.get_extra_info("ssl_object").version() if tls else None
            w.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await w.wait_closed()
        return unread, done, version

    unread, done, version = asyncio.run(main())
    assert version == (tls.replace("_", ".") if tls else None)
    assert unread is not None and done is not None
    assert done[0] == 0 and done[1] > 0
    assert total // 2 < unread[0] < total  # its small buffers held some of it, not most
