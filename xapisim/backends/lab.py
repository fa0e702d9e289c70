"""The ``lab`` guest backend: every running VM is a real lab host (see :mod:`labnet`).

``VM.start`` creates a lab host named after the VM's name_label (sanitised, unique) in a background
thread: its own network namespace on the lab bridge, its own address, its own sshd and a private
filesystem view. Once sshd answers, the backend reports the address, and the simulator publishes it
in ``VM_guest_metrics.networks``. ``shutdown`` removes the host but keeps its overlay upper dirs
(the VM's "disk") and its address for the next start; ``destroy`` removes those too; ``close``
tears down the whole lab.

For deployment (Ansible over real SSH, testinfra): ``ssh_config``, ``private_key``, ``known_hosts``
and ``add_extra_host(name)`` for a host that is not a VM (the workstation).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from labnet import Host, Lab, LabError

from .base import GuestBackend, GuestSpec

log = logging.getLogger("xapisim.lab")
_BAD = re.compile(r"[^a-z0-9-]+")


def sanitize(name_label: str, fallback: str = "vm") -> str:
    """A VM name_label as a lab host name: lowercase letters, digits and '-', at most 32 chars."""
    name = _BAD.sub("-", name_label.lower()).strip("-")[:32].strip("-")
    return name or fallback


class LabBackend(GuestBackend):
    name = "lab"

    def __init__(self, lab: Lab | None = None, workdir: str | None = None,
                 boot_timeout: float = 60.0, ip_delay: float = 0.0) -> None:
        self._own_lab = lab is None
        self.lab = lab if lab is not None else Lab.open(workdir)
        self.boot_timeout = float(boot_timeout)
        self.ip_delay = float(ip_delay)
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}            # vm_uuid -> lab host name (stable)
        self._running: dict[str, int] = {}           # vm_uuid -> start generation
        self._threads: dict[str, threading.Thread] = {}
        self._generation = 0
        self.errors: dict[str, str] = {}             # vm_uuid -> last boot error
        self.extra_hosts: dict[str, Host] = {}
        self.closed = False

    # -- paths the deploy step needs ----------------------------------------------------------

    @property
    def ssh_config(self) -> Path:
        return self.lab.ssh_config

    @property
    def private_key(self) -> Path:
        return self.lab.private_key

    @property
    def known_hosts(self) -> Path:
        return self.lab.known_hosts

    def host_for(self, vm_uuid: str) -> Host | None:
        """The running lab host of a VM (None while booting or halted)."""
        with self._lock:
            name = self._names.get(vm_uuid)
        return self.lab.hosts.get(name) if name else None

    def add_extra_host(self, name: str, *, sshd: bool = True) -> Host:
        """A lab host that is not a VM (e.g. the workstation); removed by close()."""
        if self.closed:
            raise LabError("lab backend is closed")
        host_name = sanitize(name)
        with self._lock:
            if host_name in self._names.values():
                raise LabError(f"{host_name!r} is already the name of a VM's lab host")
        host = self.lab.add_host(host_name, sshd=sshd, timeout=self.boot_timeout)
        self.extra_hosts[host_name] = host
        return host

    # -- GuestBackend -------------------------------------------------------------------------

    def _name_for(self, guest: GuestSpec) -> str:
        with self._lock:
            if guest.vm_uuid in self._names:
                return self._names[guest.vm_uuid]
            base = sanitize(guest.name_label, "vm-" + guest.vm_uuid[:8])
            taken = set(self._names.values()) | set(self.extra_hosts)
            name, n = base, 2
            while name in taken:
                suffix = f"-{n}"
                name = base[: 32 - len(suffix)] + suffix
                n += 1
            self._names[guest.vm_uuid] = name
            return name

    def start(self, guest: GuestSpec, report_ip: Callable[[str], None]) -> None:
        if self.closed:
            raise LabError("lab backend is closed")
        name = self._name_for(guest)
        with self._lock:
            if guest.vm_uuid in self._running:
                raise LabError(f"VM {guest.vm_uuid} is already running as lab host {name}")
            self._generation += 1
            gen = self._generation
            self._running[guest.vm_uuid] = gen
            self.errors.pop(guest.vm_uuid, None)
            thread = threading.Thread(target=self._boot, name=f"lab-boot-{name}", daemon=True,
                                      args=(guest, name, gen, report_ip))
            self._threads[guest.vm_uuid] = thread
        thread.start()

    def _boot(self, guest: GuestSpec, name: str, gen: int, report_ip: Callable[[str], None]) -> None:
        t0 = time.monotonic()
        try:
            host = self.lab.add_host(name, timeout=self.boot_timeout)
        except Exception as exc:  # noqa: BLE001 - a guest that fails to boot never reports an IP
            log.error("lab host %s for VM %s did not boot: %s", name, guest.vm_uuid, exc)
            with self._lock:
                self.errors[guest.vm_uuid] = str(exc)
            return
        with self._lock:
            current = self._running.get(guest.vm_uuid) == gen and not self.closed
        if not current:
            return  # shut down while booting: shutdown() removes the host after joining us
        log.info("lab host %s (%s) for VM %s up in %.2fs", name, host.ip, guest.vm_uuid,
                 time.monotonic() - t0)
        if not guest.networks:
            return  # no VIF: a real guest agent would have no address to report
        if self.ip_delay > 0:
            time.sleep(self.ip_delay)
        with self._lock:
            if self._running.get(guest.vm_uuid) != gen or self.closed:
                return
        try:
            report_ip(host.ip)
        except Exception as exc:  # noqa: BLE001 - the simulator may be stopping
            log.warning("reporting %s for VM %s failed: %s", host.ip, guest.vm_uuid, exc)

    def _stop(self, vm_uuid: str, keep_disk: bool) -> None:
        with self._lock:
            self._running.pop(vm_uuid, None)
            thread = self._threads.pop(vm_uuid, None)
            name = self._names.get(vm_uuid)
        if thread is not None:
            thread.join(timeout=self.boot_timeout + 10)
        if name is not None and not self.lab.closed:
            self.lab.remove_host(name, keep_disk=keep_disk)

    def shutdown(self, vm_uuid: str, hard: bool) -> None:
        # clean and hard are the same for a lab host: its processes are killed, its disk stays
        self._stop(vm_uuid, keep_disk=True)

    def destroy(self, vm_uuid: str) -> None:
        self._stop(vm_uuid, keep_disk=False)
        with self._lock:
            self._names.pop(vm_uuid, None)
            self.errors.pop(vm_uuid, None)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            threads = list(self._threads.values())
            self._threads.clear()
            self._running.clear()
        for t in threads:
            t.join(timeout=self.boot_timeout + 10)
        self.extra_hosts.clear()
        if self._own_lab:
            self.lab.close()
        else:
            for name in list(self._names.values()):
                self.lab.remove_host(name)
