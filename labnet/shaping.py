"""Rate shaping of a lab host's access link with htb (this kernel has no netem, fq, sfq or cls_flow).

A host's access link is its veth pair: ``eth0`` inside the host (egress = the host's upload) and the
switch port in the root namespace (egress = the host's download). Both are plain egress qdiscs, so
no ifb is needed. Every shape is::

    1:    htb root, default 1:2
    1:1   the link: rate R ceil R
    1:2   unclassified traffic (ARP, non-IP): rate R/(n+1) ceil R
    leaves, each with a bounded pfifo (bufferbloat would otherwise add seconds at 2 Mbit/s)

Regimes:

``shared``  one bottleneck, fair between peers: one leaf per peer address of the lab's /24
            (u32 hash table on the destination address for upload, the source for download),
            rate R/(n+1) ceil R, equal quanta, so N active peers get R/N each (htb DRR).
``perflow`` each TCP/UDP connection capped at ``flow_cap`` (default R/8), the whole still bounded by R:
            a classic-BPF classifier (cls_bpf; cls_flow is not built into this kernel) puts each
            connection in one of 32 x ``flow_slots`` leaves (rate R/(n+1), ceil flow_cap): 32 peer
            slots by the last octets of the two addresses (src ^ dst, mod 32: for a fixed shaped host
            that is one slot per peer as long as the peers' last octets differ mod 32, which holds for
            the lab's consecutive .10-.41), then ``(sport ^ dport) >> 1`` mod flow_slots within the
            peer. Both keys are symmetric, so both directions of a connection share a bucket index.
            Linux picks connect() source ports even and 2..16 apart per destination, so with
            flow_slots=64 up to 8 concurrent connections to one peer never share a bucket (span at
            most 7 x 16 / 2 = 56 < 64 slots; barring a wrap of the port range); beyond that two may
            and then share one cap. Above
            R/flow_cap flows the link is saturated anyway.

Leaf rates sum to R: htb lets a leaf below its own rate send without asking its parent, so leaf
rates that add up to more than R would break the link bound.

Leaf bursts: for the same reason a leaf's own-rate bucket holds one frame (``burst 1514``), while
its ceil bucket and the link class keep the usual burst (1 ms at the rate, at least 10 frames).
With the usual burst on the rate bucket too, every idle leaf had 10 frames it could send without
asking the parent: when 30 peers started at once on a 2 Mbit/s link, 30 x 15 KB left together
(1.9 x the link in the first half second, measured), and the link class then paid the debt back
with about 0.45 s of silence, in which the connections saw spurious retransmission timeouts (40 a
run at 30 peers, against 24-29 with one-frame leaf bursts). The link's bound held only on average.

Packet size: over a veth, TCP hands the qdisc GSO aggregates of up to 64 KiB, and htb lets a packet
through while its class has any tokens left, charging the whole length afterwards. Below about
500 Mbit/s an aggregate outlasts the class burst (1 ms, at least 10 frames): at 2 Mbit/s one
64 KiB packet is 262 ms of the link released at once, then silence while the class pays it back,
which no real line does and which turns into spurious retransmission timeouts when several
connections queue behind each other. So on such links the shaped host sends MTU-sized packets
(``gso_max_segs 1`` on its interface, what ``ethtool -K gso off tso off`` is advised for on slow
shaped links). That covers what the host sends (its upload); what it downloads is segmented by the
senders, which keep their aggregates.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field

from . import _sys
from .errors import LabError

PROFILES: dict[str, int] = {
    "lan": 1_000_000_000,   # LAN, 1 Gbit/s
    "tanet": 100_000_000,   # TANet (academic network), 100 Mbit/s
    "adsl": 2_000_000,      # ADSL, 2 Mbit/s
}
REGIMES = ("shared", "perflow")
DIRECTIONS = ("up", "down", "both")
MTU_FRAME = 1514
LEAF_BURST = MTU_FRAME    # a leaf's own-rate bucket: one frame
QUANTUM = 15140           # equal for every leaf: fair DRR borrowing
FLOW_SLOTS = 64           # perflow: buckets per peer
PEER_SLOTS = 32           # perflow: peers told apart (last address octet, mod 32)
SHARED_MINOR = 0x100      # 1:100 + last octet
PERFLOW_MINOR = 0x400     # 1:400 + bucket
DEFAULT_MINOR = 2

NETEM_MISSING = ("no netem on this kernel (sch_netem not available): links are rate-shaped only, "
                 "no delay or loss emulation")


def parse_rate(value: str | int) -> int:
    """'100mbit', '2Mbit', '512kbit', 1e9 or a profile name -> bits per second."""
    if isinstance(value, int):
        if value <= 0:
            raise LabError(f"rate must be positive, got {value}")
        return value
    text = value.strip().lower()
    if text in PROFILES:
        return PROFILES[text]
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    for unit, mult in units.items():
        if text.endswith(unit):
            try:
                num = float(text[: -len(unit)])
            except ValueError:
                break
            if num > 0:
                return int(num * mult)
    raise LabError(f"bad rate {value!r}: use a profile ({', '.join(PROFILES)}) or e.g. 100mbit")


def queue_limit(rate_bps: int) -> int:
    """pfifo length in packets: about 50 ms at the rate, between 32 and 1000 packets."""
    return max(32, min(1000, rate_bps * 50 // 1000 // (8 * MTU_FRAME)))


def _burst(rate_bps: int) -> int:
    return max(10 * MTU_FRAME, rate_bps // 8 // 1000)  # 1 ms at the rate, at least 10 frames


GSO_AGGREGATE = 65536     # the largest packet TCP hands a veth with GSO on (gso_max_size)


def segments_at_mtu(rate_bps: int) -> bool:
    """Whether a host shaped at this rate should send MTU-sized packets: yes when one GSO
    aggregate is longer than the class burst (below ~524 Mbit/s; see the module docstring)."""
    return GSO_AGGREGATE > _burst(rate_bps)


def gso_max_segs(dev: str, netns: str | None) -> int:
    """The device's gso_max_segs (65535 for a fresh veth)."""
    ns = ["-n", netns] if netns else []
    try:
        return int(json.loads(_sys.ip(*ns, "-d", "-j", "link", "show", "dev", dev).stdout)[0]
                   ["gso_max_segs"])
    except (ValueError, LookupError, TypeError) as exc:
        raise LabError(f"{dev}: cannot read gso_max_segs ({exc})") from None


def set_gso_max_segs(dev: str, netns: str | None, segs: int, *, check: bool = True) -> None:
    """Limit the packets TCP builds for dev to segs segments (1 = MTU-sized). Sockets pick it up
    when they connect."""
    _sys.ip_batch([f"link set dev {dev} gso_max_segs {segs}"], netns=netns, check=check)


@dataclass
class Shape:
    """What :meth:`labnet.Lab.shape` installed on a host's access link."""

    host: str
    profile: str
    rate_bps: int
    regime: str
    direction: str
    flow_cap_bps: int | None
    queue_packets: int
    devices: list[tuple[str | None, str, str]] = field(default_factory=list)  # (netns, dev, key)
    netem: bool = False
    mtu_segments: bool = False        # the host sends MTU-sized packets (GSO limited to 1 segment)
    gso_max_segs_before: int | None = None  # what unshape restores on the host's interface

    def describe(self) -> str:
        cap = f", per-flow cap {self.flow_cap_bps / 1e6:g} Mbit/s" if self.flow_cap_bps else ""
        devs = ", ".join(f"{d}({'ns ' + n if n else 'root'},{k})" for n, d, k in self.devices)
        seg = ", sends MTU-sized packets (no GSO)" if self.mtu_segments else ""
        return (f"{self.host}: {self.profile} {self.rate_bps / 1e6:g} Mbit/s {self.regime}{cap}, "
                f"{self.direction}, pfifo {self.queue_packets} pkts on {devs}{seg}")


def _class(dev: str, minor: int, rate: int, ceil: int, limit: int, parent: str = "1:1") -> list[str]:
    # A leaf's own-rate bucket holds one frame (see "Leaf bursts" in the module docstring); its
    # ceil bucket keeps the usual burst.
    return [
        f"class add dev {dev} parent {parent} classid 1:{minor:x} htb rate {rate}bit ceil {ceil}bit "
        f"burst {LEAF_BURST} cburst {_burst(ceil)} quantum {QUANTUM}",
        f"qdisc add dev {dev} parent 1:{minor:x} handle {minor:x}: pfifo limit {limit}",
    ]


def perflow_bytecode(flow_slots: int, peer_slots: int = PEER_SLOTS,
                     minor_base: int = PERFLOW_MINOR) -> str:
    """Classic BPF for cls_bpf (frames start at the Ethernet header on egress). IPv4 TCP/UDP, first
    fragment -> classid 1:(minor_base + bucket) with
    bucket = ((src_last_octet ^ dst_last_octet) % peer_slots) * flow_slots
             + ((sport ^ dport) >> 1) % flow_slots;
    anything else: no match (htb default class)."""
    for what, n in (("flow_slots", flow_slots), ("peer_slots", peer_slots)):
        if n & (n - 1) or not 1 <= n <= 256:
            raise LabError(f"{what} must be a power of two up to 256, got {n}")
    if peer_slots * flow_slots > 4096:
        raise LabError(f"peer_slots x flow_slots must be at most 4096, got {peer_slots * flow_slots}")
    shift = flow_slots.bit_length() - 1
    prog = [
        (0x28, 0, 0, 12),          # 0  ldh [12]            ethertype
        (0x15, 0, 25, 0x0800),     # 1  jeq IPv4 ? 2 : 27
        (0x30, 0, 0, 23),          # 2  ldb [23]            protocol
        (0x15, 1, 0, 6),           # 3  jeq TCP ? 5 : 4
        (0x15, 0, 22, 17),         # 4  jeq UDP ? 5 : 27
        (0x28, 0, 0, 20),          # 5  ldh [20]            flags + fragment offset
        (0x45, 20, 0, 0x1FFF),     # 6  jset offset ? 27 : 7
        (0xB1, 0, 0, 14),          # 7  ldxb 4*([14]&0xf)   IP header length
        (0x48, 0, 0, 14),          # 8  ldh [x+14]          source port
        (0x02, 0, 0, 0),           # 9  st M[0]
        (0x48, 0, 0, 16),          # 10 ldh [x+16]          destination port
        (0x61, 0, 0, 0),           # 11 ldx M[0]
        (0xAC, 0, 0, 0),           # 12 xor x
        (0x74, 0, 0, 1),           # 13 rsh #1              connect() ports are even
        (0x54, 0, 0, flow_slots - 1),  # 14 and #(flow_slots-1)
        (0x02, 0, 0, 1),           # 15 st M[1]
        (0x30, 0, 0, 29),          # 16 ldb [29]            last octet of the source address
        (0x02, 0, 0, 2),           # 17 st M[2]
        (0x30, 0, 0, 33),          # 18 ldb [33]            last octet of the destination
        (0x61, 0, 0, 2),           # 19 ldx M[2]
        (0xAC, 0, 0, 0),           # 20 xor x
        (0x54, 0, 0, peer_slots - 1),  # 21 and #(peer_slots-1)
        (0x64, 0, 0, shift),       # 22 lsh #log2(flow_slots)
        (0x61, 0, 0, 1),           # 23 ldx M[1]
        (0x4C, 0, 0, 0),           # 24 or x
        (0x04, 0, 0, (1 << 16) | minor_base),  # 25 add #classid(1:minor_base)
        (0x16, 0, 0, 0),           # 26 ret a
        (0x06, 0, 0, 0),           # 27 ret #0              no match: htb default
    ]
    return f"{len(prog)}," + ",".join(f"{c} {jt} {jf} {k}" for c, jt, jf, k in prog)


def perflow_bucket(src_ip: str, dst_ip: str, sport: int, dport: int,
                   flow_slots: int = FLOW_SLOTS, peer_slots: int = PEER_SLOTS) -> int:
    """The bucket perflow_bytecode picks for a packet (for reports and tests)."""
    peer = (int(src_ip.rsplit(".", 1)[1]) ^ int(dst_ip.rsplit(".", 1)[1])) % peer_slots
    return peer * flow_slots + ((sport ^ dport) >> 1) % flow_slots


def build_commands(dev: str, *, key: str, subnet: ipaddress.IPv4Network, own_ip: str,
                   rate_bps: int, regime: str, flow_cap_bps: int, flow_slots: int,
                   limit: int) -> list[str]:
    """tc -batch lines for one device. key is 'dst' (upload) or 'src' (download)."""
    lines = [f"qdisc add dev {dev} root handle 1: htb default {DEFAULT_MINOR:x}"]
    b = _burst(rate_bps)
    lines.append(f"class add dev {dev} parent 1: classid 1:1 htb rate {rate_bps}bit "
                 f"ceil {rate_bps}bit burst {b} cburst {b} quantum {QUANTUM}")
    if regime == "shared":
        peers = [ip for ip in subnet.hosts() if str(ip) != own_ip]
        leaf_rate = max(8, rate_bps // (len(peers) + 1))
        lines += _class(dev, DEFAULT_MINOR, leaf_rate, rate_bps, limit)
        offset = 16 if key == "dst" else 12
        lines.append(f"filter add dev {dev} parent 1: prio 1 handle 2: protocol ip u32 divisor 256")
        lines.append(f"filter add dev {dev} parent 1: prio 1 protocol ip u32 ht 800:: "
                     f"match ip {key} {subnet} hashkey mask 0x000000ff at {offset} link 2:")
        for peer in peers:
            last = int(str(peer).rsplit(".", 1)[1])
            minor = SHARED_MINOR + last
            lines += _class(dev, minor, leaf_rate, rate_bps, limit)
            lines.append(f"filter add dev {dev} parent 1: prio 1 protocol ip u32 ht 2:{last:x}: "
                         f"match ip {key} {peer}/32 flowid 1:{minor:x}")
    elif regime == "perflow":
        buckets = PEER_SLOTS * flow_slots
        leaf_rate = max(8, rate_bps // (buckets + 1))
        per_leaf = max(8, limit // 4)
        lines += _class(dev, DEFAULT_MINOR, leaf_rate, rate_bps, limit)
        for i in range(buckets):
            lines += _class(dev, PERFLOW_MINOR + i, leaf_rate, flow_cap_bps, per_leaf)
        lines.append(f"filter add dev {dev} parent 1: prio 1 protocol ip bpf "
                     f"bytecode \"{perflow_bytecode(flow_slots)}\"")
    else:
        raise LabError(f"unknown regime {regime!r}: choose one of {', '.join(REGIMES)}")
    return lines


def clear(dev: str, netns: str | None) -> None:
    """Remove the root qdisc of dev (no error if there is none or the device is gone)."""
    argv = [_sys.TC] + (["-n", netns] if netns else []) + ["qdisc", "del", "dev", dev, "root"]
    _sys.run(argv, check=False)


def apply(dev: str, netns: str | None, lines: list[str]) -> None:
    clear(dev, netns)
    argv = [_sys.TC] + (["-n", netns] if netns else []) + ["-batch", "-"]
    _sys.run(argv, input="\n".join(lines) + "\n")


def netem_available(dev: str) -> bool:
    """Probe for sch_netem on a device we own (adds then removes a netem root qdisc)."""
    cp = _sys.run([_sys.TC, "qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms"], check=False)
    if cp.returncode == 0:
        clear(dev, None)
        return True
    return False
