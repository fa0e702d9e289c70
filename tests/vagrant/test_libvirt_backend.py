"""xapisim's libvirt guest backend on one real guest: boot, IP report, disk and cleanup.

A qemu domain defined from the box image with its own overlay, on an isolated libvirt network of
the backend's own; the reported address is the DHCP lease and root logs in with the backend's key;
shutdown removes the domain but keeps the overlay, destroy removes the overlay, close removes the
network and the work directory and stops the daemons it started.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from vmrig import require_rig

pytestmark = [pytest.mark.vagrant, pytest.mark.timeout(1200)]


def test_a_guest_boots_reports_its_lease_and_leaves_nothing(tmp_path: Path) -> None:
    require_rig()
    from xapisim.backends import GuestSpec, load_backend
    from xapisim.backends.libvirt import (
        LibvirtBackend,
        LibvirtDaemons,
        default_image,
        lease_for,
        virsh,
    )

    try:
        default_image()
    except Exception as exc:  # noqa: BLE001 - no image is an environment state, not a failure here
        pytest.skip(f"{exc}")
    be = load_backend("libvirt", memory_scale=0.5)
    assert isinstance(be, LibvirtBackend)
    started_daemons = "libvirtd_pid" in LibvirtDaemons().status()
    workdir = be.workdir
    try:
        assert be.subnet is not None and be.subnet.subnet_of(ipaddress.IPv4Network("10.213.0.0/16"))
        got: list[str] = []
        reported = threading.Event()

        def report(ip: str) -> None:
            got.append(ip)
            reported.set()

        spec = GuestSpec(vm_uuid="0d6c-probe", name_label="Probe Node 1", host_name="xs-1",
                         memory_bytes=1 << 30, vcpus=1, networks=["eth0"])
        t0 = time.monotonic()
        be.start(spec, report)
        assert reported.wait(900), be.errors
        boot_s = time.monotonic() - t0
        ip = got[0]
        domain = be.domain_of(spec.vm_uuid)
        assert domain is not None and domain.startswith("ms7-xs-")
        assert ipaddress.IPv4Address(ip) in be.subnet
        assert lease_for(be.network, be._mac(spec.vm_uuid)) == ip  # the DHCP lease, not a guess
        xml = virsh("dumpxml", domain).stdout
        assert f"type='{be.driver}'" in xml and "<memory unit='KiB'>524288</memory>" in xml
        overlay = workdir / f"{domain}.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(overlay)],
                                         capture_output=True, text=True, timeout=60, check=True).stdout)
        assert info["backing-filename"] == str(be.image)
        # root logs in with the backend's key; systemd is PID 1; memory as scaled
        out = subprocess.run(["ssh", "-F", str(be.ssh_config), ip,
                              "cat /proc/1/comm; id -un; awk '/MemTotal/ {print $2}' /proc/meminfo"],
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        comm, user, mem_kib = out.stdout.split()
        assert (comm, user) == ("systemd", "root")
        assert 400 * 1024 < int(mem_kib) <= 512 * 1024
        print(f"guest up and reported in {boot_s:.0f} s (driver {be.driver})")

        be.shutdown(spec.vm_uuid, hard=True)
        assert virsh("domstate", domain, check=False).returncode != 0  # undefined
        assert overlay.exists()  # the VM's disk survives a shutdown
        be.destroy(spec.vm_uuid)
        assert not overlay.exists()
    finally:
        be.close()
    assert not workdir.exists()
    if started_daemons:
        assert not LibvirtDaemons.answering()
        assert "libvirtd_pid" not in LibvirtDaemons().status()
    else:
        names = virsh("net-list", "--all", "--name").stdout.split()
        assert be.network not in names
