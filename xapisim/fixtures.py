"""What a freshly installed XCP-ng host's database holds, built into a Database.

A pool of one: the pool object, the host with its metrics, CPUs and management PIF on ``eth0``,
the control domain (dom0), the ``xenbr0`` network plus the host-internal management network,
"Local storage" (ext), "XCP-ng Tools" (iso) and "Removable storage" (udev) SRs with their PBDs, and
a few default templates (no disks; a ``disks`` provision spec in ``other_config`` as real default
templates have). Optional extras (``SimConfig``): an NFS SR (shared storage, only on the first host)
and a ready node template, "CentOS 7 (medstream node)" — 1 GiB, 1 vCPU, a 10 GiB disk and a VIF
on ``xenbr0`` — the kind of custom template an admin prepares once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .db import NULL, Database, new_uuid
from .wire import now

GiB = 1024**3
MiB = 1024**2
API_MAJOR, API_MINOR = 2, 21  # XenServer 8 / XCP-ng 8.3 era (datamodel meta.releases "nile")
NODE_TEMPLATE = "CentOS 7 (medstream node)"
DB_SCHEMA = "5.786"
SOFTWARE_VERSION = {
    "product_version": "8.3.0",
    "product_version_text": "8.3",
    "product_version_text_short": "8.3",
    "platform_name": "XCP",
    "platform_version": "3.4.0",
    "product_brand": "XCP-ng",
    "build_number": "cloud",
    "git_id": "0",
    "hostname": "localhost",
    "date": "2024-10-01",
    "xapi": "24.19",
    "xapi_build": "24.19.2",
    "xen": "4.17.5-3",
    "linux": "4.19.0+1",
    "xencenter_min": "2.21",
    "xencenter_max": "2.21",
    "network_backend": "openvswitch",
    "db_schema": DB_SCHEMA,
}
DEFAULT_TEMPLATES = [
    ("CentOS 7", 2 * GiB, 10 * GiB),
    ("Debian Bookworm 12", 2 * GiB, 10 * GiB),
    ("Rocky Linux 9", 2 * GiB, 10 * GiB),
    ("Other install media", 1 * GiB, 8 * GiB),
]


@dataclass
class HostSpec:
    name: str
    address: str
    uuid: str
    memory_total: int = 8 * GiB
    cpus: int = 4
    dom0_memory: int = 1 * GiB
    local_sr_size: int = 500 * GiB
    shared_sr_size: int = 2048 * GiB
    shared_sr: bool = False
    node_template: bool = False


def mac_for(seed: str, device: str) -> str:
    """A deterministic locally administered MAC from (mac_seed, device), like xapi's gen_mac."""
    h = hashlib.md5(f"{seed}{device}".encode()).digest()
    return ":".join(f"{b:02x}" for b in ((h[0] & 0xFE) | 0x02, h[1], h[2], h[3], h[4], h[5]))


def vm_memory_overhead(static_max: int, vcpus: int) -> int:
    """HVM overhead estimate (shadow + device model), rounded up to a MiB; see xapi memory_check.ml."""
    raw = static_max // 128 + vcpus * MiB + 4 * MiB
    return -(-raw // MiB) * MiB


def vm_defaults(name: str, memory: int, vcpus: int, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "name_label": name,
        "power_state": "Halted",
        "memory_static_min": min(memory, 512 * MiB),
        "memory_static_max": memory,
        "memory_dynamic_min": memory,
        "memory_dynamic_max": memory,
        "memory_target": memory,
        "memory_overhead": vm_memory_overhead(memory, vcpus),
        "VCPUs_max": vcpus,
        "VCPUs_at_startup": vcpus,
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "HVM_boot_policy": "BIOS order",
        "HVM_boot_params": {"order": "cdn"},
        "HVM_shadow_multiplier": 1.0,
        "platform": {"acpi": "1", "apic": "true", "pae": "true", "viridian": "false", "nx": "true"},
        "domain_type": "hvm",
        "domid": -1,
        "user_version": 1,
        "hardware_platform_version": 0,
        "domarch": "",
    }
    rec.update(extra)
    return rec


def add_vm_metrics(db: Database, memory: int, vcpus: int) -> str:
    return db.create(
        "VM_metrics", memory_actual=0, VCPUs_number=vcpus, last_updated=now(), install_time=now()
    )


def build_host(db: Database, spec: HostSpec) -> str:
    """Populate an empty Database as a fresh standalone host; returns the host ref."""
    t = now()
    metrics = db.create(
        "host_metrics", memory_total=spec.memory_total, memory_free=spec.memory_total,
        live=True, last_updated=t,
    )
    software = dict(SOFTWARE_VERSION, hostname=spec.name)
    host = db.create(
        "host",
        uuid=spec.uuid,
        name_label=spec.name,
        name_description="Default install",
        hostname=spec.name,
        address=spec.address,
        enabled=True,
        API_version_major=API_MAJOR,
        API_version_minor=API_MINOR,
        API_version_vendor="XCP-ng",
        software_version=software,
        memory_overhead=spec.memory_total // 64,
        metrics=metrics,
        cpu_info={"cpu_count": str(spec.cpus), "socket_count": "1", "vendor": "GenuineIntel",
                  "speed": "2400.000", "modelname": "Intel(R) Xeon(R) CPU (simulated)",
                  "family": "6", "model": "85", "stepping": "7", "flags": "fpu vme de pse",
                  "features": "0000-0000-0000-0000"},
        capabilities=["xen-3.0-x86_64", "hvm-3.0-x86_32", "hvm-3.0-x86_64"],
        sched_policy="credit",
        supported_bootloaders=["pygrub", "eliloader"],
        external_auth_type="",
        edition="xcp-ng",
        license_server={"address": "localhost", "port": "27000"},
        control_domain=NULL,
    )
    for n in range(spec.cpus):
        db.create("host_cpu", host=host, number=n, vendor="GenuineIntel", speed=2400,
                  modelname="Intel(R) Xeon(R) CPU (simulated)", family=6, model=85,
                  stepping="7", flags="fpu vme de pse", features="", utilisation=0.0)
    # dom0
    dom0_metrics = add_vm_metrics(db, spec.dom0_memory, spec.cpus)
    dom0 = db.create(
        "VM",
        **vm_defaults(
            f"Control domain on host: {spec.name}", spec.dom0_memory, spec.cpus,
            power_state="Running", is_control_domain=True, resident_on=host, domid=0,
            metrics=dom0_metrics, domain_type="pv", memory_overhead=0,
            name_description="The domain which manages physical devices and manages other domains",
        ),
    )
    db.set("VM_metrics", dom0_metrics, "memory_actual", spec.dom0_memory)
    db.set("host", host, "control_domain", dom0)
    # networks and the management PIF
    xenbr0 = db.create(
        "network", name_label="Pool-wide network associated with eth0", bridge="xenbr0",
        MTU=1500, managed=True, other_config={},
    )
    db.create(
        "network", name_label="Host internal management network", bridge="xenapi",
        MTU=1500, managed=True,
        name_description="Network on which guests will be assigned a private link-local IP "
        "address which can be used to talk XenAPI",
        other_config={"is_guest_installer_network": "true",
                      "is_host_internal_management_network": "true",
                      "ip_begin": "169.254.0.1", "ip_end": "169.254.255.254",
                      "netmask": "255.255.0.0"},
    )
    db.create(
        "PIF", device="eth0", network=xenbr0, host=host, MAC=mac_for(spec.uuid, "eth0"),
        MTU=1500, VLAN=-1, physical=True, currently_attached=True, management=True,
        ip_configuration_mode="Static", IP=spec.address, netmask="255.0.0.0", gateway="",
        DNS="", primary_address_type="IPv4", managed=True,
    )
    # storage
    local = db.create(
        "SR", name_label="Local storage", type="ext", content_type="user", shared=False,
        physical_size=spec.local_sr_size, physical_utilisation=0, virtual_allocation=0,
        other_config={"i18n-key": "local-storage"}, sm_config={"devserial": "scsi-sim"},
    )
    db.create("PBD", host=host, SR=local, device_config={"device": "/dev/sda3"},
              currently_attached=True)
    tools = db.create(
        "SR", name_label="XCP-ng Tools", type="iso", content_type="iso", shared=True,
        physical_size=0, physical_utilisation=0, virtual_allocation=0,
        other_config={"xensource_internal": "true", "xenserver_tools_sr": "true",
                      "i18n-key": "xenserver-tools"},
        is_tools_sr=True,
    )
    db.create("PBD", host=host, SR=tools, device_config={"location": "/opt/xensource/packages/iso",
                                                          "legacy_mode": "true"},
              currently_attached=True)
    removable = db.create(
        "SR", name_label="Removable storage", type="udev", content_type="disk", shared=False,
        physical_size=0, physical_utilisation=0, virtual_allocation=0,
        other_config={"i18n-key": "local-hotplug-disk"}, sm_config={"type": "cd"},
    )
    db.create("PBD", host=host, SR=removable, device_config={"location": "/dev/xapi/block"},
              currently_attached=True)
    default_sr = local
    if spec.shared_sr:
        nfs = db.create(
            "SR", name_label="NFS shared storage", type="nfs", content_type="user", shared=True,
            physical_size=spec.shared_sr_size, physical_utilisation=0, virtual_allocation=0,
            other_config={"auto-scan": "true"},
        )
        db.create("PBD", host=host, SR=nfs,
                  device_config={"server": "10.213.0.2", "serverpath": "/export/sr"},
                  currently_attached=True)
        default_sr = nfs
    db.create(
        "pool", name_label="", master=host, default_SR=default_sr, suspend_image_SR=default_sr,
        crash_dump_SR=default_sr, other_config={"cpuid_feature_mask": "ffffff7f-ffffffff-ffffffff-ffffffff"},
        ha_enabled=False, restrictions={"restrict_pooling": "false"},
    )
    # default templates
    for name, mem, disk in DEFAULT_TEMPLATES:
        db.create(
            "VM",
            **vm_defaults(
                name, mem, 2, is_a_template=True, is_default_template=True,
                other_config={
                    "default_template": "true", "linux_template": "true",
                    "install-methods": "cdrom,nfs,http,ftp",
                    "disks": f'<provision><disk device="0" size="{disk}" sr="" bootable="true" '
                             'type="system"/></provision>',
                },
                name_description=f"Template for {name}",
            ),
        )
    if spec.node_template:
        add_node_template(db, host, default_sr, xenbr0)
    return host


def add_node_template(db: Database, host: str, sr: str, network: str) -> str:
    vdi_size = 10 * GiB
    seed = new_uuid()
    metrics = add_vm_metrics(db, GiB, 1)
    vm = db.create(
        "VM",
        **vm_defaults(
            NODE_TEMPLATE, GiB, 1, is_a_template=True, is_default_template=False,
            metrics=metrics,
            other_config={"mac_seed": seed, "base_template_name": "CentOS 7",
                          "linux_template": "true"},
            name_description="CentOS 7 minimal with sshd and the guest agent; 1 vCPU, 1 GiB",
        ),
    )
    vdi = db.create(
        "VDI", name_label="CentOS 7 (medstream node) 0", SR=sr, virtual_size=vdi_size,
        physical_utilisation=vdi_size // 5, type="system", sharable=False, read_only=False,
        managed=True, other_config={}, location=new_uuid(),
    )
    sr_rec = db.get("SR", sr)
    db.update("SR", sr, virtual_allocation=sr_rec["virtual_allocation"] + vdi_size,
              physical_utilisation=sr_rec["physical_utilisation"] + vdi_size // 5)
    db.create("VBD", VM=vm, VDI=vdi, userdevice="0", device="", bootable=True, mode="RW",
              type="Disk", empty=False, unpluggable=False, other_config={"owner": ""})
    db.create("VIF", VM=vm, network=network, device="0", MAC=mac_for(seed, "0"),
              MAC_autogenerated=True, MTU=1500, locking_mode="network_default")
    return vm
