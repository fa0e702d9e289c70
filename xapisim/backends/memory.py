"""The ``memory`` guest backend: guests are records; each reports a synthetic IP after a delay.

Addresses come from ``cidr`` (default 10.213.128.0/17, inside the lab range 10.213.0.0/16, never
routed anywhere) in order; a VM keeps its address across restarts, as a DHCP reservation would.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable

from .base import GuestBackend, GuestSpec


class MemoryBackend(GuestBackend):
    name = "memory"

    def __init__(self, cidr: str = "10.213.128.0/17", ip_delay: float = 0.0) -> None:
        self.network = ipaddress.ip_network(cidr)
        self.ip_delay = float(ip_delay)
        self._hosts = self.network.hosts()
        self._lock = threading.Lock()
        self._ips: dict[str, str] = {}
        self._timers: dict[str, threading.Timer] = {}
        self.running: dict[str, GuestSpec] = {}
        self.closed = False

    def _ip_for(self, vm_uuid: str) -> str:
        with self._lock:
            if vm_uuid not in self._ips:
                try:
                    self._ips[vm_uuid] = str(next(self._hosts))
                except StopIteration:
                    raise RuntimeError(f"address pool {self.network} exhausted") from None
            return self._ips[vm_uuid]

    def start(self, guest: GuestSpec, report_ip: Callable[[str], None]) -> None:
        if self.closed:
            raise RuntimeError("backend closed")
        ip = self._ip_for(guest.vm_uuid)
        with self._lock:
            self.running[guest.vm_uuid] = guest
            old = self._timers.pop(guest.vm_uuid, None)
            if old is not None:
                old.cancel()
            if not guest.networks:
                return  # no VIF: the guest agent has no address to report
            timer = threading.Timer(self.ip_delay, self._report, (guest.vm_uuid, ip, report_ip))
            timer.daemon = True
            self._timers[guest.vm_uuid] = timer
        timer.start()

    def _report(self, vm_uuid: str, ip: str, report_ip: Callable[[str], None]) -> None:
        with self._lock:
            if vm_uuid not in self.running or self.closed:
                return
            self._timers.pop(vm_uuid, None)
        report_ip(ip)

    def shutdown(self, vm_uuid: str, hard: bool) -> None:
        with self._lock:
            self.running.pop(vm_uuid, None)
            timer = self._timers.pop(vm_uuid, None)
        if timer is not None:
            timer.cancel()

    def destroy(self, vm_uuid: str) -> None:
        self.shutdown(vm_uuid, hard=True)
        with self._lock:
            self._ips.pop(vm_uuid, None)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            timers = list(self._timers.values())
            self._timers.clear()
            self.running.clear()
        for t in timers:
            t.cancel()
