"""The libvirt backend's pieces that need no VM: domain and network XML, sockets, names, leftovers.

Not marked ``vagrant``: these run in the default suite in well under a second.
"""

from __future__ import annotations

import ipaddress
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

from xapisim.backends.libvirt import (
    _socket_answers,
    domain_xml,
    free_subnet,
    network_xml,
    sanitize,
)


def test_domain_xml_tcg_has_small_translation_cache_and_no_host_cpu(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(name="ms7-xs-ab12-node-01", driver="qemu", memory_mib=512, vcpus=1,
                                    disk=tmp_path / "d.qcow2", network="ms7-xs-ab12", mac="52:54:00:01:02:03",
                                    serial_log=tmp_path / "s.log", tb_cache_mib=64))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "ms7-xs-ab12-node-01"
    mem = root.find("memory")
    assert mem is not None and (mem.get("unit"), mem.text) == ("MiB", "512")
    assert root.findtext("vcpu") == "1"
    tb = root.find("features/tcg/tb-cache")
    assert tb is not None and tb.text == "64"
    cpu = root.find("cpu")
    assert cpu is not None and cpu.get("mode") == "maximum"
    src = root.find("devices/disk/source")
    assert src is not None and src.get("file") == str(tmp_path / "d.qcow2")
    iface = root.find("devices/interface")
    assert iface is not None
    assert iface.find("source").get("network") == "ms7-xs-ab12"  # type: ignore[union-attr]
    assert iface.find("mac").get("address") == "52:54:00:01:02:03"  # type: ignore[union-attr]


def test_domain_xml_kvm_passes_the_host_cpu_and_has_no_tcg_block(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(name="d", driver="kvm", memory_mib=1024, vcpus=2, disk=tmp_path / "d",
                                    network="n", mac="52:54:00:00:00:01", serial_log=tmp_path / "s",
                                    tb_cache_mib=64))
    assert root.get("type") == "kvm" and root.find("features/tcg") is None
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]


def test_names_are_escaped_into_the_xml(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(name="a<b>&c", driver="qemu", memory_mib=256, vcpus=1,
                                    disk=tmp_path / "x'y", network="n", mac="52:54:00:00:00:01",
                                    serial_log=tmp_path / "s", tb_cache_mib=0))
    assert root.findtext("name") == "a<b>&c" and root.find("features/tcg") is None


def test_network_is_isolated_with_dhcp_inside_the_subnet() -> None:
    net = ipaddress.IPv4Network("10.213.71.0/24")
    root = ET.fromstring(network_xml("ms7-xs-ab12", "ms7brab12", net))
    assert root.find("forward") is None  # isolated: no NAT, no routing
    ip = root.find("ip")
    assert ip is not None and ip.get("address") == "10.213.71.1"
    rng = root.find("ip/dhcp/range")
    assert rng is not None
    assert ipaddress.IPv4Address(rng.get("start")) in net and ipaddress.IPv4Address(rng.get("end")) in net
    bridge = root.find("bridge")
    assert bridge is not None and len(bridge.get("name", "")) <= 15  # IFNAMSIZ


def test_free_subnet_stays_in_the_ms7_range_and_skips_used_ones() -> None:
    net = free_subnet()
    assert net.subnet_of(ipaddress.IPv4Network("10.213.64.0/20"))
    assert net != ipaddress.IPv4Network("10.213.70.0/24")  # the Vagrantfile's
    assert free_subnet(range(71, 80), skip=(net.network_address.packed[2],)) != net


def test_sanitize_makes_domain_safe_names() -> None:
    assert sanitize("CentOS 7 (medstream node) #3") == "centos-7-medstream-node-3"
    assert sanitize("///") == "vm"
    assert len(sanitize("x" * 80)) == 32


def test_a_stale_socket_file_does_not_count_as_a_daemon(tmp_path: Path) -> None:
    path = str(tmp_path / "d.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    try:
        assert _socket_answers(path)
    finally:
        srv.close()
    assert Path(path).exists()  # the file stays, as after a killed virtlogd
    assert not _socket_answers(path)
    assert not _socket_answers(str(tmp_path / "missing.sock"))
