"""Shaping logic without the kernel: the classic-BPF per-flow classifier, run by a small cBPF
interpreter on synthetic frames, against shaping.perflow_bucket; rates and tc lines."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from labnet import LabError
from labnet.shaping import (
    PERFLOW_MINOR,
    build_commands,
    parse_rate,
    perflow_bucket,
    perflow_bytecode,
    queue_limit,
    segments_at_mtu,
)


def run_cbpf(bytecode: str, frame: bytes) -> int:
    """Interpret the subset of classic BPF that perflow_bytecode uses."""
    parts = bytecode.split(",")
    prog = [tuple(int(v) for v in ins.split()) for ins in parts[1:]]
    assert int(parts[0]) == len(prog)
    a = x = 0
    mem = [0] * 16
    pc = 0
    for _ in range(1000):
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x28:
            a = struct.unpack_from("!H", frame, k)[0]
        elif code == 0x30:
            a = frame[k]
        elif code == 0x48:
            a = struct.unpack_from("!H", frame, x + k)[0]
        elif code == 0xB1:
            x = 4 * (frame[k] & 0xF)
        elif code == 0x02:
            mem[k] = a
        elif code == 0x61:
            x = mem[k]
        elif code == 0xAC:
            a ^= x
        elif code == 0x4C:
            a |= x
        elif code == 0x74:
            a >>= k
        elif code == 0x64:
            a = (a << k) & 0xFFFFFFFF
        elif code == 0x54:
            a &= k
        elif code == 0x04:
            a = (a + k) & 0xFFFFFFFF
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x45:
            pc += jt if a & k else jf
        elif code == 0x16:
            return a
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {code:#x} not interpreted")
    raise AssertionError("program did not return")


def frame(src: str, dst: str, sport: int, dport: int, proto: int = 6, ihl: int = 5,
          frag: int = 0, ethertype: int = 0x0800) -> bytes:
    eth = b"\x02" * 12 + struct.pack("!H", ethertype)
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 60, 1, frag, 64, proto, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    ip += b"\x00" * (4 * ihl - 20)
    return eth + ip + struct.pack("!HH", sport, dport) + b"\x00" * 16


@pytest.mark.parametrize("flow_slots", [16, 64])
def test_cbpf_classifier_matches_perflow_bucket(flow_slots: int) -> None:
    code = perflow_bytecode(flow_slots)
    ws = "10.213.77.10"
    for last in range(11, 41):
        node = f"10.213.77.{last}"
        for sport in (32768, 40000, 40002, 60998):
            for proto, ihl in ((6, 5), (17, 5), (6, 7)):
                up = run_cbpf(code, frame(ws, node, sport, 7370, proto, ihl))
                down = run_cbpf(code, frame(node, ws, 7370, sport, proto, ihl))
                want = (1 << 16) | (PERFLOW_MINOR + perflow_bucket(ws, node, sport, 7370, flow_slots))
                assert up == down == want  # symmetric: both directions of a connection
    # other traffic falls through to the htb default class
    assert run_cbpf(code, frame(ws, "10.213.77.11", 1, 2, proto=1)) == 0           # ICMP
    assert run_cbpf(code, frame(ws, "10.213.77.11", 1, 2, frag=5)) == 0            # fragment
    assert run_cbpf(code, frame(ws, "10.213.77.11", 1, 2, ethertype=0x0806)) == 0  # ARP


def test_consecutive_connections_and_peers_get_distinct_buckets() -> None:
    ws = "10.213.77.10"
    peers = [f"10.213.77.{i}" for i in range(11, 42)]
    # 8 connections per peer, ports 2..16 apart (Linux's connect() port allocation)
    buckets = set()
    for n, peer in enumerate(peers):
        port = 33000 + 2 * n * 997 % 20000
        for step in (16, 2, 16, 8, 16, 16, 16, 16):
            buckets.add(perflow_bucket(ws, peer, port, 7370))
            port += step
    assert len(buckets) == 8 * len(peers)


def test_rates_queues_and_commands() -> None:
    assert parse_rate("tanet") == 100_000_000
    assert parse_rate("512kbit") == 512_000
    assert parse_rate("1.5Mbit") == 1_500_000
    for bad in ("fast", "-3mbit", "0mbit"):
        with pytest.raises(LabError, match="bad rate"):
            parse_rate(bad)
    assert queue_limit(2_000_000) == 32 and queue_limit(10**9) == 1000
    net = ipaddress.IPv4Network("10.213.77.0/24")
    shared = build_commands("eth0", key="dst", subnet=net, own_ip="10.213.77.10",
                            rate_bps=100_000_000, regime="shared", flow_cap_bps=0, flow_slots=64,
                            limit=100)
    leaves = [line for line in shared if line.startswith("class add") and "parent 1:1 " in line]
    assert len(leaves) == 254  # default + 253 peers
    rate_sum = sum(int(line.split(" rate ")[1].split("bit")[0]) for line in leaves)
    assert rate_sum <= 100_000_000  # leaf rates never oversubscribe the link
    assert any("match ip dst 10.213.77.11/32 flowid 1:10b" in line for line in shared)
    perflow = build_commands("eth0", key="dst", subnet=net, own_ip="10.213.77.10",
                             rate_bps=2_000_000, regime="perflow", flow_cap_bps=250_000,
                             flow_slots=64, limit=32)
    leaves = [line for line in perflow if line.startswith("class add") and "parent 1:1 " in line]
    assert len(leaves) == 1 + 32 * 64
    assert sum(int(line.split(" rate ")[1].split("bit")[0]) for line in leaves) <= 2_000_000
    assert sum(" ceil 250000bit" in line for line in leaves) == 32 * 64
    # A leaf's own-rate bucket holds one frame, so idle leaves cannot together burst past the
    # link; the ceil buckets and the link class keep 10 frames (1 ms is less at these rates).
    assert all(" burst 1514 cburst 15140 " in line for line in leaves)
    assert " burst 15140 cburst 15140 " in perflow[1] and "classid 1:1 " in perflow[1]
    with pytest.raises(LabError, match="regime"):
        build_commands("eth0", key="dst", subnet=net, own_ip="10.213.77.10", rate_bps=1,
                       regime="fifo", flow_cap_bps=1, flow_slots=64, limit=1)
    with pytest.raises(LabError, match="power of two"):
        perflow_bytecode(48)


def test_slow_links_carry_mtu_sized_packets_and_lan_keeps_gso() -> None:
    # A 64 KiB aggregate is 262 ms at 2 Mbit/s and 5 ms at 100 Mbit/s, far over the 1 ms burst;
    # at 1 Gbit/s it fits (0.5 ms).
    assert segments_at_mtu(parse_rate("adsl")) and segments_at_mtu(parse_rate("tanet"))
    assert not segments_at_mtu(parse_rate("lan"))
    assert segments_at_mtu(500_000_000) and not segments_at_mtu(600_000_000)

