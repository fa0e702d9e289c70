"""The ``libvirt`` guest backend: every running VM is a real qemu domain booted from the medstream image.

``VM.start`` gives the VM a copy-on-write overlay of the box image built by ``vagrant/build-box``
(``$MEDSTREAM_VM_CACHE/current-image``), defines a libvirt domain (1 vCPU per VM vCPU, memory the
VM's memory times ``memory_scale``) on an isolated libvirt network of its own (DHCP, no forwarding,
a free /24 in 10.213.0.0/16), starts it, and once the guest has leased an address and its sshd
answers, reports that address. ``shutdown`` stops and undefines the domain but keeps the overlay
(the VM's disk); ``destroy`` removes the overlay too; ``close`` removes every domain, the network
and the work directory, and stops libvirtd/virtlogd if this backend started them.

The guest is a real Debian with systemd as PID 1, so Ansible roles take their systemd branch. As on
lab hosts, log in as root with ``private_key`` (or ``ssh -F ssh_config``): a key this backend
generates and installs for root on each guest after boot, logging in once as ``vagrant`` with
Vagrant's well-known insecure key (the network is isolated and reachable only from this machine).

``/dev/kvm`` is used only when a guest really boots on it (``kvm_usable``, cached); otherwise the
domains run under qemu's software emulation (TCG) with a small translation cache.

Command line (for scripts and Makefiles)::

    python -m xapisim.backends.libvirt daemons start|stop|status   # libvirtd/virtlogd by hand
    python -m xapisim.backends.libvirt kvm-probe                   # does KVM boot the image here?
    python -m xapisim.backends.libvirt leftovers                   # ms7-* domains/networks/pools left
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape as _escape

from .base import GuestBackend, GuestSpec

log = logging.getLogger("xapisim.libvirt")

URI = "qemu:///system"
CACHE_DIR = Path(os.environ.get("MEDSTREAM_VM_CACHE", "/var/cache/medstream/vm"))
RUN_DIR = Path(os.environ.get("MEDSTREAM_VM_RUN", "/run/medstream-vm"))
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
PREFIX = "ms7"
POOL_NAME = "ms7"
LIBVIRT_CHAINS = {
    "filter": ["LIBVIRT_INP", "LIBVIRT_OUT", "LIBVIRT_FWO", "LIBVIRT_FWI", "LIBVIRT_FWX"],
    "nat": ["LIBVIRT_PRT"],
    "mangle": ["LIBVIRT_PRT"],
}
_BAD = re.compile(r"[^a-z0-9-]+")


def escape(text: str) -> str:
    """Text for XML content or a quoted attribute (either quote)."""
    return _escape(text, {"'": "&apos;", '"': "&quot;"})


class LibvirtBackendError(RuntimeError):
    """Anything the libvirt backend or its daemon helper could not do."""


def _run(args: list[str], *, timeout: float = 60.0, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    except FileNotFoundError as exc:
        raise LibvirtBackendError(f"{args[0]} not found: run vagrant/host-deps") from exc
    except subprocess.TimeoutExpired as exc:
        raise LibvirtBackendError(f"{' '.join(args[:3])} timed out after {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LibvirtBackendError(f"{' '.join(args[:4])}: {msg[-1] if msg else 'failed'}")
    return proc


def virsh(*args: str, timeout: float = 60.0, check: bool = True,
          input: str | None = None) -> subprocess.CompletedProcess[str]:
    return _run(["virsh", "-q", "-c", URI, *args], timeout=timeout, check=check, input=input)


def sanitize(name_label: str, fallback: str = "vm") -> str:
    name = _BAD.sub("-", name_label.lower()).strip("-")[:32].strip("-")
    return name or fallback


def default_image() -> Path:
    """The box image the last ``vagrant/build-box`` run produced."""
    pointer = CACHE_DIR / "current-image"
    try:
        image = Path(pointer.read_text().strip())
    except OSError:
        raise LibvirtBackendError(
            f"no guest image ({pointer} missing): run vagrant/build-box --no-add first") from None
    if not image.is_file():
        raise LibvirtBackendError(f"guest image {image} is gone: run vagrant/build-box --no-add")
    return image


def vagrant_insecure_key() -> Path:
    for path in sorted(Path("/usr/share/rubygems-integration/all/gems").glob("vagrant-*/keys/vagrant")):
        return path
    raise LibvirtBackendError("Vagrant's insecure key not found: run vagrant/host-deps")


def _socket_answers(path: str) -> bool:
    """A unix socket someone listens on (a stale socket file left by a killed daemon does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _pid_alive(pid: int, exe_name: str) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return os.path.basename(exe).split(" ")[0] == exe_name


def _kill_pid(pid: int, exe_name: str, timeout: float = 20.0) -> None:
    if not _pid_alive(pid, exe_name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid, exe_name):
        time.sleep(0.2)
    if _pid_alive(pid, exe_name):
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# libvirtd / virtlogd started by hand (PID 1 is not systemd here)
# --------------------------------------------------------------------------------------------------


class LibvirtDaemons:
    """Make ``qemu:///system`` answer; remember what was started or changed, undo exactly that.

    State lives in ``run_dir/state.json`` so that ``daemons start`` and ``daemons stop`` may be
    separate processes. ``stop()`` kills only the PIDs it started (checked against /proc/PID/exe),
    restores ``qemu.conf``, removes the transient ``ms7`` storage pool it created and libvirt's
    iptables chains if they did not exist before.
    """

    def __init__(self, run_dir: Path = RUN_DIR, pool_dir: Path | None = None,
                 pool_name: str = POOL_NAME, qemu_conf: Path = QEMU_CONF) -> None:
        self.run_dir = Path(run_dir)
        self.pool_dir = Path(pool_dir) if pool_dir else CACHE_DIR / "pool"
        self.pool_name = pool_name
        self.qemu_conf = qemu_conf
        self.state_file = self.run_dir / "state.json"

    # -- state --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, object]]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state: dict[str, object] = json.loads(self.state_file.read_text())
            except (OSError, ValueError):
                state = {}
            yield state
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(self.state_file)

    @staticmethod
    def answering() -> bool:
        if not Path("/run/libvirt/libvirt-sock").exists():
            return False
        try:
            return virsh("uri", timeout=20, check=False).returncode == 0
        except LibvirtBackendError:
            return False

    def _qemu_conf_ok(self) -> bool:
        try:
            text = self.qemu_conf.read_text()
        except OSError:
            return False
        return bool(re.search(r'^\s*user\s*=\s*"root"', text, re.M)) and bool(
            re.search(r'^\s*group\s*=\s*"root"', text, re.M))

    def start(self, pool: bool = True) -> None:
        """Start what is missing (idempotent). Raises LibvirtBackendError if libvirtd won't answer."""
        with self._locked() as state:
            if not self.answering():
                if not self._qemu_conf_ok():
                    # Without user/group root, /dev/kvm (0600) looks unusable, the capability cache is
                    # judged stale and every call re-probes qemu (virsh define: 47 s instead of 0.02 s).
                    backup = self.run_dir / "qemu.conf.orig"
                    if not backup.exists():
                        shutil.copy2(self.qemu_conf, backup)
                    with open(self.qemu_conf, "a") as conf:
                        conf.write('\n# added by medstream (xapisim.backends.libvirt); restored on stop\n'
                                   'user = "root"\ngroup = "root"\n')
                    state["qemu_conf_patched"] = True
                # A state file left by a killed session keeps its (older, truer) list.
                state.setdefault("chains_before", self._existing_chains())
                if not _socket_answers("/run/libvirt/virtlogd-sock"):
                    pidfile = self.run_dir / "virtlogd.pid"
                    _run(["virtlogd", "-d", "-p", str(pidfile)], timeout=30)
                    state["virtlogd_pid"] = self._read_pid(pidfile)
                pidfile = self.run_dir / "libvirtd.pid"
                _run(["libvirtd", "-d", "-p", str(pidfile)], timeout=30)
                state["libvirtd_pid"] = self._read_pid(pidfile)
                deadline = time.monotonic() + 90
                while not self.answering():
                    if time.monotonic() > deadline:
                        raise LibvirtBackendError("libvirtd started but does not answer after 90 s")
                    time.sleep(0.5)
                log.info("libvirtd answering (pid %s)", state.get("libvirtd_pid"))
            if pool and virsh("pool-info", self.pool_name, check=False, timeout=30).returncode != 0:
                self.pool_dir.mkdir(parents=True, exist_ok=True)
                virsh("pool-create-as", self.pool_name, "dir", "--target", str(self.pool_dir), timeout=60)
                state["pool_created"] = True

    @staticmethod
    def _read_pid(pidfile: Path) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return int(pidfile.read_text().strip())
            time.sleep(0.1)
        raise LibvirtBackendError(f"no pid in {pidfile}")

    def status(self) -> dict[str, object]:
        with self._locked() as state:
            return {"answering": self.answering(), **state}

    def stop(self) -> None:
        """Undo what start() did (and only that)."""
        with self._locked() as state:
            if state.get("pool_created") and self.answering():
                virsh("pool-destroy", self.pool_name, check=False, timeout=60)
            state.pop("pool_created", None)
            pid = state.pop("libvirtd_pid", None)
            if isinstance(pid, int):
                if self.answering():
                    left = [d for d in virsh("list", "--name", check=False).stdout.split() if d]
                    if left:
                        log.warning("stopping libvirtd with domains still running: %s", ", ".join(left))
                _kill_pid(pid, "libvirtd")
            pid = state.pop("virtlogd_pid", None)
            if isinstance(pid, int):
                _kill_pid(pid, "virtlogd")
            before = state.pop("chains_before", None)
            if isinstance(before, list):
                self._remove_chains(set(before))
            if state.pop("qemu_conf_patched", False):
                backup = self.run_dir / "qemu.conf.orig"
                if backup.exists():
                    shutil.copy2(backup, self.qemu_conf)
                    backup.unlink()

    # -- libvirt's iptables chains ---------------------------------------------------------------
    @staticmethod
    def _existing_chains() -> list[str]:
        found = []
        for tool in ("iptables", "ip6tables"):
            for table, chains in LIBVIRT_CHAINS.items():
                proc = _run([tool, "-w", "-t", table, "-S"], check=False, timeout=30)
                for chain in chains:
                    if f"-N {chain}" in proc.stdout.splitlines():
                        found.append(f"{tool}:{table}:{chain}")
        return found

    @classmethod
    def _remove_chains(cls, keep: set[str]) -> None:
        parents = {"LIBVIRT_INP": "INPUT", "LIBVIRT_OUT": "OUTPUT", "LIBVIRT_FWO": "FORWARD",
                   "LIBVIRT_FWI": "FORWARD", "LIBVIRT_FWX": "FORWARD", "LIBVIRT_PRT": "POSTROUTING"}
        for entry in cls._existing_chains():
            if entry in keep:
                continue
            tool, table, chain = entry.split(":")
            _run([tool, "-w", "-t", table, "-D", parents[chain], "-j", chain], check=False)
            _run([tool, "-w", "-t", table, "-F", chain], check=False)
            _run([tool, "-w", "-t", table, "-X", chain], check=False)


# --------------------------------------------------------------------------------------------------
# KVM or TCG
# --------------------------------------------------------------------------------------------------


def kvm_usable(image: Path | None = None, timeout: float = 75.0,
               cache_dir: Path = CACHE_DIR) -> tuple[bool, str]:
    """Does a stock Debian guest really boot under /dev/kvm here? (result cached per kernel/image).

    Boots the image under ``-enable-kvm`` with the serial console on a file and waits for the
    login prompt. A nested PVM /dev/kvm (this machine) hangs in the kernel decompressor.
    """
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc.strerror}"
    image = image or default_image()
    modules = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm"))
    key = hashlib.sha256(
        f"{os.uname().release} {modules} {image} {image.stat().st_size}".encode()).hexdigest()[:16]
    cached = cache_dir / f"kvm-probe-{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(cached.read_text())
        return bool(data["usable"]), str(data["reason"]) + " (cached)"
    usable, reason = _probe_kvm(image, timeout)
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"usable": usable, "reason": reason, "modules": modules}))
    return usable, reason


def _probe_kvm(image: Path, timeout: float) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="ms7-kvmprobe-") as tmp:
        overlay = Path(tmp) / "probe.qcow2"
        serial = Path(tmp) / "serial.log"
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay)])
        t0 = time.monotonic()
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-m", "512", "-smp", "1",
             "-drive", f"file={overlay},if=virtio", "-nic", "none", "-display", "none",
             "-serial", f"file:{serial}", "-no-reboot"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while time.monotonic() - t0 < timeout:
                if proc.poll() is not None:
                    err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                    return False, f"qemu -enable-kvm exited: {err.strip().splitlines()[-1:] or '?'}"
                text = serial.read_bytes().decode(errors="replace") if serial.exists() else ""
                if "login:" in text:
                    return True, f"a guest booted under KVM in {time.monotonic() - t0:.0f} s"
                time.sleep(1)
            return False, f"no guest booted under KVM within {timeout:.0f} s (nested/paravirtual /dev/kvm?)"
        finally:
            proc.kill()
            proc.wait(timeout=30)
            if proc.stderr:
                proc.stderr.close()


def accel_choice(image: Path | None = None) -> tuple[str, str]:
    """("kvm"|"qemu", why): ``$MEDSTREAM_VM_ACCEL`` (kvm, qemu, auto) wins, else the KVM probe."""
    forced = os.environ.get("MEDSTREAM_VM_ACCEL", "auto").lower()
    if forced in ("kvm", "qemu", "tcg"):
        return ("kvm" if forced == "kvm" else "qemu"), f"MEDSTREAM_VM_ACCEL={forced}"
    ok, why = kvm_usable(image)
    return ("kvm" if ok else "qemu"), why


# --------------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------------


def _used_subnets() -> set[ipaddress.IPv4Network]:
    used: set[ipaddress.IPv4Network] = set()
    proc = _run(["ip", "-4", "-o", "addr", "show"], check=False)
    for match in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", proc.stdout):
        used.add(ipaddress.IPv4Interface(match.group(1)).network)
    return used


def free_subnet(candidates: range = range(71, 80), skip: tuple[int, ...] = ()) -> ipaddress.IPv4Network:
    """A /24 in 10.213.71-79.0 (10.213.70.0/24 is the Vagrantfile's) that no interface here uses."""
    used = _used_subnets()
    for third in candidates:
        if third in skip:
            continue
        net = ipaddress.IPv4Network(f"10.213.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise LibvirtBackendError("no free /24 in 10.213.71.0-10.213.79.0 for a libvirt network")


def network_xml(name: str, bridge: str, subnet: ipaddress.IPv4Network) -> str:
    hosts = list(subnet.hosts())
    gw, first, last = hosts[0], hosts[9], hosts[-5]
    # No <forward>: an isolated network; libvirt's own iptables rules reject forwarding.
    return (f"<network><name>{escape(name)}</name><bridge name='{escape(bridge)}' stp='off' delay='0'/>"
            f"<ip address='{gw}' netmask='{subnet.netmask}'><dhcp>"
            f"<range start='{first}' end='{last}'/></dhcp></ip></network>")


def domain_xml(*, name: str, driver: str, memory_mib: int, vcpus: int, disk: Path, network: str,
               mac: str, serial_log: Path, tb_cache_mib: int) -> str:
    cpu = "<cpu mode='host-passthrough'/>" if driver == "kvm" else "<cpu mode='maximum'/>"
    tcg = (f"<tcg><tb-cache unit='MiB'>{tb_cache_mib}</tb-cache></tcg>"
           if driver == "qemu" and tb_cache_mib > 0 else "")
    return f"""<domain type='{driver}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/>{tcg}</features>
  {cpu}
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{escape(str(disk))}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='network'><source network='{escape(network)}'/><mac address='{mac}'/>
      <model type='virtio'/></interface>
    <serial type='file'><source path='{escape(str(serial_log))}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def lease_for(network: str, mac: str) -> str | None:
    proc = virsh("net-dhcp-leases", network, "--mac", mac, check=False, timeout=30)
    for line in proc.stdout.splitlines():
        match = re.search(r"ipv4\s+(\d+\.\d+\.\d+\.\d+)/\d+", line)
        if match and mac in line.lower():
            return match.group(1)
    return None


def sshd_answers(ip: str, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((ip, 22), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------------


@dataclass
class ExtraGuest:
    """A domain that is not a simulated VM (e.g. the workstation)."""

    name: str
    ip: str
    domain: str


@dataclass
class _Guest:
    vm_uuid: str
    domain: str
    overlay: Path
    serial_log: Path
    mac: str
    generation: int = 0
    ip: str | None = None
    running: bool = False


class LibvirtBackend(GuestBackend):
    """Simulated VMs as qemu domains under libvirt (see the module docstring)."""

    name = "libvirt"

    def __init__(self, image: str | None = None, workdir: str | None = None, memory_scale: float = 0.5,
                 memory_min_mib: int = 256, memory_max_mib: int = 2048, boot_timeout: float = 900.0,
                 max_parallel_boots: int = 3, tb_cache_mib: int = 64, driver: str | None = None,
                 subnet: str | None = None, daemons: LibvirtDaemons | None = None) -> None:
        self.image = Path(image) if image else default_image()
        self.memory_scale = float(memory_scale)
        self.memory_min_mib = int(memory_min_mib)
        self.memory_max_mib = int(memory_max_mib)
        self.boot_timeout = float(boot_timeout)
        self.tb_cache_mib = int(tb_cache_mib)
        self._boot_slots = threading.BoundedSemaphore(max(1, int(max_parallel_boots)))
        self._lock = threading.Lock()
        self._guests: dict[str, _Guest] = {}
        self._extra: dict[str, ExtraGuest] = {}
        self._threads: list[threading.Thread] = []
        self._generation = 0
        self.errors: dict[str, str] = {}
        self.closed = False
        self.tag = f"{PREFIX}-xs-{os.urandom(2).hex()}"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.daemons = daemons or LibvirtDaemons()
        self._own_daemons = daemons is None
        self.network = self.tag
        self.subnet: ipaddress.IPv4Network | None = None
        try:
            self.daemons.start(pool=False)
            if driver in ("kvm", "qemu"):
                self.driver, self.driver_reason = driver, "asked for"
            else:
                self.driver, self.driver_reason = accel_choice(self.image)
            log.info("libvirt backend %s: driver %s (%s)", self.tag, self.driver, self.driver_reason)
            self._create_network(subnet)
            key = self.workdir / "id_vagrant"
            shutil.copyfile(vagrant_insecure_key(), key)
            key.chmod(0o600)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.tag,
                  "-f", str(self.private_key)], timeout=30)
            self.known_hosts.touch()
            self._write_ssh_config()
        except BaseException:
            self.close()
            raise

    # -- what deployment needs ----------------------------------------------------------------
    ssh_user = "root"

    @property
    def private_key(self) -> Path:
        """This backend's own key: root on every guest it booted accepts it (as on lab hosts)."""
        return self.workdir / "id_ed25519"

    @property
    def vagrant_key(self) -> Path:
        return self.workdir / "id_vagrant"

    def _authorize_root(self, ip: str, deadline: float) -> None:
        """Log in as ``vagrant`` (the box's insecure key) and let root in with this backend's key."""
        pub = self.private_key.with_suffix(".pub").read_text()
        script = ("sudo sh -c 'umask 077 && mkdir -p /root/.ssh && "
                  "cat > /root/.ssh/authorized_keys'")
        last = ""
        while time.monotonic() < deadline:
            proc = _run(["ssh", "-F", "none", "-i", str(self.vagrant_key), "-o", "IdentitiesOnly=yes",
                         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                         "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "ConnectTimeout=20",
                         f"vagrant@{ip}", script], input=pub, timeout=90, check=False)
            if proc.returncode == 0:
                return
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            time.sleep(3)
        raise LibvirtBackendError(f"{ip}: could not authorize root's key: {last}")

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.workdir / "ssh_config"

    def _write_ssh_config(self) -> None:
        self.ssh_config.write_text(
            f"Host *\n  User {self.ssh_user}\n  IdentityFile {self.private_key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n  StrictHostKeyChecking accept-new\n"
            "  ConnectTimeout 20\n  ServerAliveInterval 15\n")

    def ip_of(self, vm_uuid: str) -> str | None:
        with self._lock:
            guest = self._guests.get(vm_uuid)
            return guest.ip if guest and guest.running else None

    def domain_of(self, vm_uuid: str) -> str | None:
        with self._lock:
            guest = self._guests.get(vm_uuid)
            return guest.domain if guest else None

    # -- network --------------------------------------------------------------------------------
    def _create_network(self, subnet: str | None) -> None:
        net = ipaddress.IPv4Network(subnet) if subnet else free_subnet()
        if not net.subnet_of(ipaddress.IPv4Network("10.213.0.0/16")):
            raise LibvirtBackendError(f"subnet {net} is outside 10.213.0.0/16")
        self.subnet = net
        bridge = "ms7br" + self.tag.rsplit("-", 1)[-1]
        xml = self.workdir / "network.xml"
        xml.write_text(network_xml(self.network, bridge, net))
        virsh("net-create", str(xml), timeout=60)  # transient: gone when destroyed

    # -- lifecycle ----------------------------------------------------------------------------------
    def memory_mib_for(self, memory_bytes: int) -> int:
        mib = int(memory_bytes * self.memory_scale) // (1 << 20)
        return max(self.memory_min_mib, min(self.memory_max_mib, mib))

    def _mac(self, key: str) -> str:
        digest = hashlib.sha256(f"{self.tag}/{key}".encode()).digest()
        return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])

    def start(self, guest: GuestSpec, report_ip: Callable[[str], None]) -> None:
        if self.closed:
            raise LibvirtBackendError("libvirt backend is closed")
        with self._lock:
            g = self._guests.get(guest.vm_uuid)
            if g is None:
                label = sanitize(guest.name_label)
                taken = {x.domain for x in self._guests.values()}
                domain = f"{self.tag}-{label}"
                n = 2
                while domain in taken:
                    domain = f"{self.tag}-{label}-{n}"
                    n += 1
                g = _Guest(vm_uuid=guest.vm_uuid, domain=domain,
                           overlay=self.workdir / f"{domain}.qcow2",
                           serial_log=self.workdir / f"{domain}.serial.log",
                           mac=self._mac(guest.vm_uuid))
                self._guests[guest.vm_uuid] = g
            self._generation += 1
            g.generation = self._generation
            g.running = True
            g.ip = None
            generation = g.generation
        self.errors.pop(guest.vm_uuid, None)
        memory = self.memory_mib_for(guest.memory_bytes)
        thread = threading.Thread(target=self._boot, name=f"libvirt-boot-{g.domain}",
                                  args=(g, generation, memory, max(1, guest.vcpus), report_ip),
                                  daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _current(self, g: _Guest, generation: int) -> bool:
        with self._lock:
            return not self.closed and g.running and g.generation == generation

    def _boot(self, g: _Guest, generation: int, memory_mib: int, vcpus: int,
              report_ip: Callable[[str], None]) -> None:
        try:
            deadline = time.monotonic() + self.boot_timeout
            while not self._boot_slots.acquire(timeout=2):
                if not self._current(g, generation):
                    return
                if time.monotonic() > deadline:
                    raise LibvirtBackendError("timed out waiting for a boot slot")
            try:
                if not self._current(g, generation):
                    return
                ip = self._define_and_boot(g.domain, g.overlay, g.serial_log, g.mac, memory_mib,
                                           vcpus, deadline, lambda: self._current(g, generation))
            finally:
                self._boot_slots.release()
            if ip is None:
                return
            with self._lock:
                if not (g.running and g.generation == generation) or self.closed:
                    return
                g.ip = ip
            log.info("%s is up at %s", g.domain, ip)
            report_ip(ip)
        except Exception as exc:  # a boot thread must report, not crash silently
            log.error("booting %s failed: %s", g.domain, exc)
            self.errors[g.vm_uuid] = str(exc)

    def _define_and_boot(self, domain: str, overlay: Path, serial_log: Path, mac: str,
                         memory_mib: int, vcpus: int, deadline: float,
                         still_wanted: Callable[[], bool]) -> str | None:
        if not overlay.exists():
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.image),
                  str(overlay)])
        xml = self.workdir / f"{domain}.xml"
        xml.write_text(domain_xml(name=domain, driver=self.driver, memory_mib=memory_mib, vcpus=vcpus,
                                  disk=overlay, network=self.network, mac=mac, serial_log=serial_log,
                                  tb_cache_mib=self.tb_cache_mib))
        virsh("define", str(xml), timeout=120)
        virsh("start", domain, timeout=120)
        ip: str | None = None
        while True:
            if not still_wanted():
                return None
            if time.monotonic() > deadline:
                raise LibvirtBackendError(
                    f"{domain}: no {'sshd' if ip else 'DHCP lease'} within {self.boot_timeout:.0f} s")
            if ip is None:
                ip = lease_for(self.network, mac)
            if ip is not None and sshd_answers(ip):
                self._authorize_root(ip, deadline)
                return ip
            time.sleep(2)

    def _remove_domain(self, domain: str, hard: bool) -> None:
        state = virsh("domstate", domain, check=False, timeout=30)
        if state.returncode != 0:
            return  # not defined
        if "running" in state.stdout and not hard:
            virsh("shutdown", domain, check=False, timeout=30)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if "running" not in virsh("domstate", domain, check=False, timeout=30).stdout:
                    break
                time.sleep(1)
        virsh("destroy", domain, check=False, timeout=60)
        virsh("undefine", domain, check=False, timeout=60)

    def shutdown(self, vm_uuid: str, hard: bool) -> None:
        with self._lock:
            g = self._guests.get(vm_uuid)
            if g is None:
                return
            g.running = False
            g.ip = None
        self._remove_domain(g.domain, hard)

    def destroy(self, vm_uuid: str) -> None:
        with self._lock:
            g = self._guests.pop(vm_uuid, None)
        if g is None:
            return
        g.running = False
        self._remove_domain(g.domain, hard=True)
        for path in (g.overlay, g.serial_log, self.workdir / f"{g.domain}.xml"):
            path.unlink(missing_ok=True)
        self.errors.pop(vm_uuid, None)

    def wait_booted(self, timeout: float) -> None:
        """Join boot threads (bounded); for tests and orderly shutdown."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- guests that are not VMs ---------------------------------------------------------------------
    def add_extra_host(self, name: str, memory_mib: int = 512, timeout: float | None = None) -> ExtraGuest:
        """Boot a domain that is not a simulated VM (the workstation) and wait until sshd answers."""
        if self.closed:
            raise LibvirtBackendError("libvirt backend is closed")
        label = sanitize(name)
        domain = f"{self.tag}-x-{label}"
        with self._lock:
            if label in self._extra:
                return self._extra[label]
        deadline = time.monotonic() + (timeout or self.boot_timeout)
        if not self._boot_slots.acquire(timeout=max(1.0, deadline - time.monotonic())):
            raise LibvirtBackendError(f"{domain}: no boot slot")
        try:
            ip = self._define_and_boot(domain, self.workdir / f"{domain}.qcow2",
                                       self.workdir / f"{domain}.serial.log", self._mac("x/" + label),
                                       memory_mib, 1, deadline, lambda: not self.closed)
        finally:
            self._boot_slots.release()
        if ip is None:
            raise LibvirtBackendError(f"{domain}: backend closed while booting")
        extra = ExtraGuest(name=label, ip=ip, domain=domain)
        with self._lock:
            self._extra[label] = extra
        return extra

    # -- teardown ---------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            guests = list(self._guests.values())
            self._guests.clear()
            self._extra.clear()
            threads = list(self._threads)
        for t in threads:
            t.join(30)
        try:
            if LibvirtDaemons.answering():
                names = virsh("list", "--all", "--name", check=False).stdout.split()
                for domain in names:
                    if domain.startswith(self.tag + "-"):
                        self._remove_domain(domain, hard=True)
                if virsh("net-info", self.network, check=False, timeout=30).returncode == 0:
                    virsh("net-destroy", self.network, check=False, timeout=60)
                    virsh("net-undefine", self.network, check=False, timeout=60)
        finally:
            for g in guests:
                g.overlay.unlink(missing_ok=True)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if self._own_daemons:
                self.daemons.stop()


def leftovers(prefix: str = PREFIX) -> dict[str, list[str]]:
    """Domains, networks and pools named ``prefix-*`` (or exactly ``prefix``) that libvirt still has."""
    out: dict[str, list[str]] = {"domains": [], "networks": [], "pools": []}
    if not LibvirtDaemons.answering():
        return out
    for key, cmd in (("domains", "list"), ("networks", "net-list"), ("pools", "pool-list")):
        names = virsh(cmd, "--all", "--name", check=False).stdout.split()
        out[key] = [n for n in names if n == prefix or n.startswith(prefix + "-")]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xapisim.backends.libvirt",
        description="Helpers for medstream's real VMs: libvirtd/virtlogd started by hand (PID 1 is not "
                    "systemd here) and stopped by PID, the KVM probe, and a leftover check.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("daemons", help="start/stop/status of libvirtd+virtlogd (and the 'ms7' pool)")
    d.add_argument("action", choices=["start", "stop", "status"])
    d.add_argument("--no-pool", action="store_true", help="do not create the transient 'ms7' pool")
    sub.add_parser("kvm-probe", help="does a guest really boot under /dev/kvm? (cached)")
    sub.add_parser("leftovers", help="list ms7-* domains/networks/pools; exit 1 if any")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.cmd == "daemons":
            daemons = LibvirtDaemons()
            if args.action == "start":
                daemons.start(pool=not args.no_pool)
                print("libvirtd answering on", URI)
            elif args.action == "stop":
                daemons.stop()
                print("stopped what medstream started")
            else:
                print(json.dumps(daemons.status(), indent=1))
            return 0
        if args.cmd == "kvm-probe":
            driver, why = accel_choice()
            print(f"{driver}: {why}")
            return 0
        left = leftovers()
        print(json.dumps(left))
        return 1 if any(left.values()) else 0
    except LibvirtBackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
