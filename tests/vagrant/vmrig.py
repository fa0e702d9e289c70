"""Real VMs (qemu under libvirt, Vagrant): shared checks and helpers for tests/vagrant.

These tests boot Debian guests under qemu's software emulation and take minutes; they are marked
``vagrant`` and deselected by default (pyproject addopts). Run them with ``make test-vms``, which
installs the host packages (vagrant/host-deps) and holds the machine's CPU lock. They skip, saying
why, when this machine cannot run them (not root, a tool missing, no box image).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TOOLS = ("qemu-system-x86_64", "qemu-img", "virsh", "libvirtd", "virtlogd", "dnsmasq", "vagrant",
         "debootstrap", "ssh", "iptables")


def rig_unavailable() -> str | None:
    """Why real VMs cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "real-VM tests need root (libvirtd started by hand, debootstrap)"
    missing = [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if missing:
        return f"real-VM tests need {', '.join(missing)}: run vagrant/host-deps (or make test-vms)"
    if not list(Path("/usr/share/rubygems-integration/all/gems").glob("vagrant-libvirt-*")):
        return "real-VM tests need the vagrant-libvirt plugin: run vagrant/host-deps"
    if not Path("/dev/kvm").exists() and shutil.which("qemu-system-x86_64") is None:
        return "neither KVM nor qemu's software emulation is available"
    return None


def require_rig() -> None:
    why = rig_unavailable()
    if why:
        pytest.skip(why)


def leftovers() -> dict[str, list[str]]:
    """ms7-* domains, networks and pools libvirt still has (libvirtd must be answering)."""
    from xapisim.backends.libvirt import leftovers as lv_leftovers

    return lv_leftovers()


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float,
        log: Path | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a command (bounded); with ``log``, its output goes to that file as well."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}[rc={proc.returncode}]\n")
    return proc


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
