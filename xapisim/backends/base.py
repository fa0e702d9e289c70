"""The guest backend interface: what a simulated VM is underneath.

The simulator owns the XenAPI records; a backend owns the guest itself. ``memory`` guests are
records with synthetic IPs; ``lab`` guests are real lab hosts (network namespaces with sshd);
``libvirt`` guests are real qemu/KVM domains. The simulator calls the backend when a VM starts,
stops or is destroyed, and the backend reports the guest's IP once the guest would report it
(a real guest agent reports after boot), from any thread.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GuestSpec:
    vm_uuid: str
    name_label: str
    host_name: str
    memory_bytes: int
    vcpus: int
    networks: list[str] = field(default_factory=list)  # network name_labels, in VIF device order


class GuestBackend(abc.ABC):
    name: str = "abstract"

    @abc.abstractmethod
    def start(self, guest: GuestSpec, report_ip: Callable[[str], None]) -> None:
        """Begin booting the guest; may return before it is up. Call report_ip(ip) once it is."""

    @abc.abstractmethod
    def shutdown(self, vm_uuid: str, hard: bool) -> None:
        """Stop the guest (clean or hard); its disk state survives for a later start."""

    @abc.abstractmethod
    def destroy(self, vm_uuid: str) -> None:
        """Remove everything the guest had (called after shutdown, or on VM.destroy)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Tear down everything this backend made: no process, namespace or disk left behind."""
