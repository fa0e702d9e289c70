"""``--sim`` wiring: a throwaway pool on xapisim for ``xenctl up --sim``.

The only module of xenctl that imports ``xapisim`` (and, through its lab backend, ``labnet``).
Everything it starts is stopped when the context exits, also on Ctrl-C or SIGTERM: the lab hosts
(network namespaces, sshd), the simulator, Ansible's SSH connection masters (their sockets live in
the simulator's directory, and each is told to exit), and every file: the inventory, the deploy
state (PKI, token, logs), Ansible's controller temp dir (``ANSIBLE_LOCAL_TEMP``, set while the
context is open) and the certificates all live in the simulator's temporary directory,
which is removed. Only the wheelhouse cache (``~/.local/state/medstream/wheelhouse``, keyed by a
hash of the sources) is kept, so the next run does not rebuild it. While tearing down, further
SIGINT / SIGTERM are ignored so a second Ctrl-C cannot leave half a lab behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from . import procs
from .spec import CloudSpec, GiB, Secret, load_spec
from .up import DeployOptions

__all__ = ["SimCloud", "sim_cloud"]

TEMPLATE = "CentOS 7 (medstream node)"
NETWORK = "Pool-wide network associated with eth0"
MEMORY_CIDR = "10.213.128.0/17"  # the memory backend's guest addresses
LOCAL_TEMP_ENV = "ANSIBLE_LOCAL_TEMP"


@dataclass
class SimCloud:
    spec: CloudSpec
    password: Secret
    deploy: DeployOptions
    sim: Any
    workdir: Path  # removed on exit: put the inventory and anything else per-run here


def _control_path_dir(workdir: Path) -> Path:
    """A directory for Ansible's SSH control sockets. A socket path must fit in 108 bytes and
    ssh appends ``/<10 hex>.<16 random>`` while binding, so a long TMPDIR gets a short
    ``/tmp/xenctl-cp-<pid>-*`` instead (removed at exit like everything else)."""
    inside = workdir / "cp"
    if len(str(inside)) <= 70:
        inside.mkdir(mode=0o700)
        return inside
    return Path(tempfile.mkdtemp(prefix=f"xenctl-cp-{os.getpid()}-", dir="/tmp"))


def _close_ssh_masters(cp_dir: Path) -> None:
    """Ask every SSH connection master whose socket is in ``cp_dir`` to exit (``ssh -O exit``):
    Ansible leaves them running for ControlPersist seconds, and one whose lab host vanished
    would otherwise linger until its keep-alives time out."""
    if not cp_dir.is_dir():
        return
    for sock in sorted(cp_dir.iterdir()):
        try:
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "xenctl-sim"],
                           capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass


@contextmanager
def sim_cloud(nodes: int, *, backend: str = "memory", hosts: int = 3,
              cloud: str = "medstream") -> Iterator[SimCloud]:
    """Start xapisim with ``hosts`` standalone hosts sized for ``nodes`` 1 GiB nodes."""
    from xapisim import SimConfig, SimServer

    per_host = -(-max(nodes, 1) // hosts)
    memory = (per_host * 1088 // 1024 + 3) * GiB  # nodes + overhead + dom0 + headroom
    sim = SimServer(SimConfig(hosts=hosts, backend=backend, host_memory=memory, sync_interval=5.0))

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt
    previous_term = signal.signal(signal.SIGTERM, on_term)
    previous_int = signal.getsignal(signal.SIGINT)
    cp_dir: Path | None = None
    deploy: DeployOptions | None = None
    saved_env: list[str | None] = []  # [previous value] once the environment was touched
    try:
        sim.start()
        assert sim.workdir is not None
        workdir = Path(sim.workdir) / "xenctl"
        workdir.mkdir(mode=0o700)
        cp_dir = _control_path_dir(workdir)
        deploy = DeployOptions(state_dir=workdir / "state",
                               extra_vars={"ansible_control_path_dir": str(cp_dir)})
        # ansible-playbook's own temp dir (an interrupted run cannot clean it): ours too; only
        # settable through the environment, which the deploy runner passes on
        saved_env.append(os.environ.get(LOCAL_TEMP_ENV))
        os.environ[LOCAL_TEMP_ENV] = str(workdir / "ansible-tmp")
        cidr = MEMORY_CIDR
        workstation = ""
        key = None
        if backend in ("lab", "libvirt"):
            be: Any = sim.backend  # xapisim.backends.lab.LabBackend or .libvirt.LibvirtBackend
            cidr = str(be.lab.subnet) if backend == "lab" else str(be.subnet)
            ws = be.add_extra_host("workstation")
            workstation = str(ws.ip)
            key = be.private_key
            deploy.ssh_config = be.ssh_config
            deploy.private_key = be.private_key
            deploy.known_hosts = getattr(be, "known_hosts", None)
        addrs = [f"{h.address}:{sim.port}" for h in sim.hosts]
        spec = load_spec(None, env={}, overrides={
            "cloud": cloud, "pool.master": addrs[0], "pool.members": addrs[1:],
            "pool.tls.ca_file": sim.ca_file, "nodes.count": nodes, "nodes.template": TEMPLATE,
            "nodes.network": NETWORK, "nodes.cidr": cidr, "nodes.ssh_private_key": key,
            "workstation.address": workstation or None, "workstation.ssh_private_key": key,
            "nodes.ip_timeout": 900 if backend == "libvirt" else 300,  # TCG boots take minutes
        })
        yield SimCloud(spec, Secret(sim.password), deploy, sim, workdir)
    finally:
        # no second Ctrl-C / SIGTERM in the middle of the teardown
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if cp_dir is not None:
                _close_ssh_masters(cp_dir)
                for _ in range(3):  # a socket bound meanwhile makes rmdir fail: try again
                    shutil.rmtree(cp_dir, ignore_errors=True)
                    if not cp_dir.exists():
                        break
                    time.sleep(0.2)
            if deploy is not None:  # the masters, now exiting, are our children: reap them
                procs.end_children(only=deploy.adopted)
            sim.stop()
        finally:
            for previous in saved_env:
                if previous is None:
                    os.environ.pop(LOCAL_TEMP_ENV, None)
                else:
                    os.environ[LOCAL_TEMP_ENV] = previous
            signal.signal(signal.SIGTERM, previous_term)
            signal.signal(signal.SIGINT, _restorable(previous_int))


def _restorable(handler: Any) -> Callable[..., Any] | int:
    """``signal.getsignal`` may return None (a handler not set from Python): restore the default."""
    return handler if handler is not None else signal.SIG_DFL
