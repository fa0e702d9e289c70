"""cloud.yml: the storage cloud's description, validated, with flag > env > file > default.

Strategy: the YAML is composed once to remember every key's line, merged with the environment
(``XENCTL_*``, and the ``XENSERVER_*`` names the Ansible modules use) and the command line flags,
then turned into frozen dataclasses. Every problem is reported as ``file:line: key: problem`` (or
``XENCTL_X: key: problem`` when the bad value came from the environment).

Passwords are never read from argv: the password comes from ``--password-file`` / ``XENCTL_PASSWORD``
/ ``XENSERVER_PASSWORD`` / ``XENCTL_PASSWORD_FILE`` / ``pool.password_file`` / ``pool.password_env``
or a hidden prompt, and lives in a :class:`Secret` whose repr is masked.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .errors import CredentialsError, SpecError

__all__ = [
    "CloudSpec",
    "NodesSpec",
    "PoolSpec",
    "Secret",
    "TLSSpec",
    "WorkstationSpec",
    "host_url",
    "load_spec",
    "normalize_fingerprint",
    "parse_size",
    "resolve_password",
]

GiB = 1024**3
MiB = 1024**2

# environment variable -> dotted spec key; the first name found wins
ENV_KEYS: dict[str, tuple[str, ...]] = {
    "cloud": ("XENCTL_CLOUD",),
    "pool.master": ("XENCTL_MASTER", "XENSERVER_HOST"),
    "pool.members": ("XENCTL_MEMBERS",),
    "pool.username": ("XENCTL_USERNAME", "XENSERVER_USER", "XENSERVER_USERNAME"),
    "pool.name": ("XENCTL_POOL_NAME",),
    "pool.tls.ca_file": ("XENCTL_CA_FILE",),
    "pool.tls.fingerprints": ("XENCTL_FINGERPRINTS",),
    "pool.tls.insecure": ("XENCTL_INSECURE",),
    "nodes.count": ("XENCTL_NODES",),
    "nodes.template": ("XENCTL_TEMPLATE",),
    "nodes.memory": ("XENCTL_MEMORY",),
    "nodes.vcpus": ("XENCTL_VCPUS",),
    "nodes.network": ("XENCTL_NETWORK",),
    "nodes.sr": ("XENCTL_SR",),
    "nodes.placement": ("XENCTL_PLACEMENT",),
    "nodes.cidr": ("XENCTL_CIDR",),
    "nodes.concurrency": ("XENCTL_CONCURRENCY",),
    "nodes.ip_timeout": ("XENCTL_IP_TIMEOUT",),
}
PASSWORD_ENV = ("XENCTL_PASSWORD", "XENSERVER_PASSWORD")
PASSWORD_FILE_ENV = "XENCTL_PASSWORD_FILE"


class Secret:
    """A string that does not show itself in repr/str/logs. ``reveal()`` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class TLSSpec:
    ca_file: Path | None = None
    # host (as written in master/members, lowercased) -> accepted SHA-256 fingerprints (hex);
    # key "*" applies to every host
    fingerprints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    insecure: bool = False

    def pins_for(self, host: str) -> tuple[str, ...]:
        return tuple(self.fingerprints.get(host.lower(), ())) + tuple(self.fingerprints.get("*", ()))


@dataclass(frozen=True)
class PoolSpec:
    master: str  # https://host:port
    members: tuple[str, ...] = ()
    name: str = "medstream"
    username: str = "root"
    password_env: str = ""
    password_file: Path | None = None
    tls: TLSSpec = field(default_factory=TLSSpec)

    @property
    def all_hosts(self) -> tuple[str, ...]:
        return (self.master, *self.members)


@dataclass(frozen=True)
class NodesSpec:
    name: str = "node"
    count: int = 0
    template: str = ""
    vcpus: int = 1
    memory: int = GiB
    network: str = ""
    sr: str = ""
    placement: str = "spread"
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    ip_timeout: float = 600.0
    shutdown_timeout: float = 120.0
    concurrency: int = 10
    ssh_user: str = "root"
    ssh_private_key: Path | None = None


@dataclass(frozen=True)
class WorkstationSpec:
    address: str = ""
    ssh_user: str = "root"
    ssh_private_key: Path | None = None


@dataclass(frozen=True)
class CloudSpec:
    cloud: str
    pool: PoolSpec
    nodes: NodesSpec
    workstation: WorkstationSpec
    source: str = "<defaults>"


def parse_size(value: Any) -> int:
    """``1GiB``, ``512MiB``, ``1G`` (binary), ``2GB`` (decimal) or a byte count."""
    if isinstance(value, bool):
        raise ValueError("is a boolean, not a size")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"{value!r} is not a size (use e.g. 1GiB, 1024MiB or bytes)")
    number = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        mult = 1
    elif unit.endswith("IB") or len(unit) == 1:
        mult = 1024 ** powers[unit[0]]
    else:  # KB, MB, GB: decimal
        mult = 1000 ** powers[unit[0]]
    result = int(number * mult)
    if result <= 0:
        raise ValueError("must be positive")
    return result


def normalize_fingerprint(value: str) -> str:
    """``sha256:AB:CD:..``, ``AB:CD:..`` or hex -> 64 lowercase hex digits."""
    text = str(value).strip()
    if text.lower().startswith("sha256:"):
        text = text[7:]
    text = text.replace(":", "").replace(" ", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ValueError(f"{value!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return text


def host_url(value: str, *, default_port: int = 443) -> str:
    """Normalize ``host``, ``host:port``, ``[v6]:port`` or ``https://host[:port]`` to a URL."""
    text = str(value).strip()
    if not text:
        raise ValueError("is empty")
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http"):
        raise ValueError(f"{value!r}: scheme must be https:// (or http:// with --insecure)")
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host name")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ValueError(f"{value!r}: bad port") from exc
    if parts.path not in ("", "/"):
        raise ValueError(f"{value!r}: give the host only, XenAPI lives at /")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    _ = default_port
    return f"{parts.scheme}://{host}:{port}"


def url_host(url: str) -> str:
    """The bare host of a URL made by :func:`host_url` (no brackets, no port)."""
    return urlsplit(url).hostname or url


# --------------------------------------------------------------------------- loading

class _Located:
    """Values with where they came from, for error messages."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.where: dict[str, str] = {}

    def set(self, key: str, value: Any, where: str) -> None:
        self.values[key] = value
        self.where[key] = where

    def err(self, key: str, problem: str) -> SpecError:
        where = self.where.get(key, "default")
        return SpecError(f"{where}: {key}: {problem}")


_KNOWN = {
    "cloud", "pool", "nodes", "workstation",
    "pool.master", "pool.members", "pool.name", "pool.username", "pool.password_env",
    "pool.password_file", "pool.password", "pool.tls", "pool.tls.ca_file", "pool.tls.fingerprints",
    "pool.tls.insecure",
    "nodes.name", "nodes.count", "nodes.template", "nodes.vcpus", "nodes.memory", "nodes.network",
    "nodes.sr", "nodes.placement", "nodes.cidr", "nodes.ip_timeout", "nodes.shutdown_timeout",
    "nodes.concurrency", "nodes.ssh_user", "nodes.ssh_private_key",
    "workstation.address", "workstation.ssh_user", "workstation.ssh_private_key",
}
_SECTIONS = {"pool", "nodes", "workstation", "pool.tls"}
# keys whose value is a mapping/list and must not be flattened further
_LEAF_CONTAINERS = {"pool.members", "pool.tls.fingerprints"}


def _walk(node: yaml.Node, prefix: str, path: str, out: _Located) -> None:
    if not isinstance(node, yaml.MappingNode):
        raise SpecError(f"{path}:{node.start_mark.line + 1}: {prefix or 'top level'}: must be a mapping")
    for knode, vnode in node.value:
        key = f"{prefix}.{knode.value}" if prefix else str(knode.value)
        line = f"{path}:{knode.start_mark.line + 1}"
        if key not in _KNOWN:
            close = [k for k in _KNOWN if k.rsplit(".", 1)[-1] == str(knode.value)]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SpecError(f"{line}: {key}: unknown key{hint}")
        if key == "pool.password":
            raise SpecError(f"{line}: pool.password: a password does not belong in cloud.yml; "
                            "use pool.password_file, pool.password_env, XENCTL_PASSWORD or the prompt")
        if key in _SECTIONS:
            if isinstance(vnode, yaml.ScalarNode) and vnode.value in ("", "~", "null"):
                continue
            _walk(vnode, key, path, out)
        else:
            value = yaml.safe_load(yaml.serialize(vnode)) if key in _LEAF_CONTAINERS else \
                yaml.safe_load(yaml.serialize(vnode))
            out.set(key, value, line)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{v!r} is not a boolean (true/false)")


def _int(v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool):
        raise ValueError("is a boolean, not a number")
    try:
        n = int(str(v).strip())
    except ValueError as exc:
        raise ValueError(f"{v!r} is not a whole number") from exc
    if not lo <= n <= hi:
        raise ValueError(f"{n} is out of range {lo}..{hi}")
    return n


def _float(v: Any, lo: float) -> float:
    try:
        n = float(str(v).strip())
    except ValueError as exc:
        raise ValueError(f"{v!r} is not a number of seconds") from exc
    if n < lo:
        raise ValueError(f"{n} must be at least {lo}")
    return n


def _list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [p for p in re.split(r"[,\s]+", v) if p]
    if isinstance(v, list):
        return [str(p) for p in v]
    raise ValueError("must be a list of addresses")


def _fingerprints(v: Any) -> dict[str, tuple[str, ...]]:
    """A list (any host), a mapping host -> fp or list of fps, or ``host=fp,host=fp`` text."""
    out: dict[str, list[str]] = {}
    if v is None or v == "":
        return {}
    if isinstance(v, str):
        items: list[tuple[str, Any]] = []
        for part in [p for p in re.split(r"[,\s]+", v) if p]:
            host, sep, fp = part.rpartition("=")
            items.append((host if sep else "*", fp))
    elif isinstance(v, list):
        items = [("*", fp) for fp in v]
    elif isinstance(v, dict):
        items = []
        for host, fps in v.items():
            for fp in (fps if isinstance(fps, list) else [fps]):
                items.append((str(host), fp))
    else:
        raise ValueError("must be a list of fingerprints or a mapping host: fingerprint")
    for host, fp in items:
        key = "*" if host == "*" else url_host(host_url(host))
        out.setdefault(key.lower(), []).append(normalize_fingerprint(str(fp)))
    return {k: tuple(vs) for k, vs in out.items()}


def load_spec(path: str | os.PathLike[str] | None = None, *,
              env: Mapping[str, str] | None = None,
              overrides: Mapping[str, Any] | None = None) -> CloudSpec:
    """Read cloud.yml (optional), then the environment, then ``overrides`` (flags, dotted keys).

    Raises :class:`SpecError` naming the file and line (or variable, or flag) of a bad value.
    """
    env = os.environ if env is None else env
    loc = _Located()
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(f"{p}: cannot read: {exc.strerror or exc}") from exc
        try:
            root = yaml.compose(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise SpecError(f"{p}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
        if root is not None:
            _walk(root, "", str(p), loc)
    for key, names in ENV_KEYS.items():
        for name in names:
            if env.get(name, "") != "":
                loc.set(key, env[name], name)
                break
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _KNOWN:
            raise SpecError(f"internal: unknown override {key}")
        loc.set(key, value, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))
    return _build(loc, source)


def _build(loc: _Located, source: str) -> CloudSpec:
    v = loc.values

    def conv(key: str, fn: Callable[[Any], Any], default: Any) -> Any:
        if key not in v or v[key] is None:
            return default
        try:
            return fn(v[key])
        except (ValueError, TypeError) as exc:
            raise loc.err(key, str(exc)) from exc

    def path_of(x: Any) -> Path:
        return Path(os.path.expanduser(str(x)))

    insecure = conv("pool.tls.insecure", _bool, False)

    def url(x: Any) -> str:
        u = host_url(str(x))
        if u.startswith("http://") and not insecure:
            raise ValueError(f"{x!r}: plain http sends the password in clear; use https:// "
                             "(or --insecure for a throwaway lab)")
        return u

    master = conv("pool.master", url, None)
    if master is None:
        raise SpecError(f"{source}: pool.master: missing (set it in cloud.yml, XENCTL_MASTER or --master)")
    members = tuple(conv("pool.members", lambda x: [url(m) for m in _list(x)], []))
    if master in members:
        raise loc.err("pool.members", f"the master {master} is also listed as a member")
    if len(set(members)) != len(members):
        raise loc.err("pool.members", "lists a host twice")
    ca_file = conv("pool.tls.ca_file", path_of, None)
    if ca_file is not None and not ca_file.is_file():
        raise loc.err("pool.tls.ca_file", f"{ca_file} is not a readable file")
    fps = conv("pool.tls.fingerprints", _fingerprints, {})
    tls = TLSSpec(ca_file=ca_file, fingerprints=fps, insecure=insecure)
    pw_file = conv("pool.password_file", path_of, None)
    pool = PoolSpec(
        master=master, members=members,
        name=conv("pool.name", lambda x: _name(x, 255), "medstream"),
        username=conv("pool.username", lambda x: _name(x, 255), "root"),
        password_env=conv("pool.password_env", str, ""),
        password_file=pw_file, tls=tls,
    )
    cidr = conv("nodes.cidr", lambda x: ipaddress.ip_network(str(x), strict=False), None)
    placement = conv("nodes.placement", str, "spread")
    if placement not in ("spread", "pack"):
        raise loc.err("nodes.placement", f"{placement!r} must be spread or pack")
    memory = conv("nodes.memory", parse_size, GiB)
    if memory < 64 * MiB:
        raise loc.err("nodes.memory", f"{memory} bytes is below the 64 MiB a guest needs")
    nodes = NodesSpec(
        name=conv("nodes.name", _dnsname, "node"),
        count=conv("nodes.count", lambda x: _int(x, 0, 1000), 0),
        template=conv("nodes.template", str, ""),
        vcpus=conv("nodes.vcpus", lambda x: _int(x, 1, 64), 1),
        memory=memory,
        network=conv("nodes.network", str, ""),
        sr=conv("nodes.sr", str, ""),
        placement=placement,
        cidr=cidr,
        ip_timeout=conv("nodes.ip_timeout", lambda x: _float(x, 1.0), 600.0),
        shutdown_timeout=conv("nodes.shutdown_timeout", lambda x: _float(x, 0.0), 120.0),
        concurrency=conv("nodes.concurrency", lambda x: _int(x, 1, 64), 10),
        ssh_user=conv("nodes.ssh_user", str, "root"),
        ssh_private_key=conv("nodes.ssh_private_key", path_of, None),
    )
    ws = WorkstationSpec(
        address=conv("workstation.address", str, ""),
        ssh_user=conv("workstation.ssh_user", str, "root"),
        ssh_private_key=conv("workstation.ssh_private_key", path_of, None),
    )
    return CloudSpec(cloud=conv("cloud", _dnsname, "medstream"), pool=pool, nodes=nodes,
                     workstation=ws, source=source)


def _name(x: Any, limit: int) -> str:
    text = str(x)
    if not text or len(text) > limit:
        raise ValueError(f"must be 1..{limit} characters")
    return text


def _dnsname(x: Any) -> str:
    text = str(x)
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?", text):
        raise ValueError(f"{text!r} must be lowercase letters, digits and dashes (a host name)")
    return text


# --------------------------------------------------------------------------- password

def resolve_password(pool: PoolSpec, *, env: Mapping[str, str] | None = None,
                     password_file: str | os.PathLike[str] | None = None,
                     prompt: Callable[[str], str] | None = None) -> Secret:
    """The pool password: ``--password-file`` > ``XENCTL_PASSWORD``/``XENSERVER_PASSWORD`` >
    ``XENCTL_PASSWORD_FILE`` > ``pool.password_file`` > ``pool.password_env`` > hidden prompt.

    Never from argv. ``prompt`` (e.g. ``click.prompt(hide_input=True)``) is only used when given.
    """
    env = os.environ if env is None else env
    if password_file is not None:
        return Secret(_read_password_file(Path(password_file), "--password-file"))
    for name in PASSWORD_ENV:
        if env.get(name):
            return Secret(env[name])
    if env.get(PASSWORD_FILE_ENV):
        return Secret(_read_password_file(Path(env[PASSWORD_FILE_ENV]), PASSWORD_FILE_ENV))
    if pool.password_file is not None:
        return Secret(_read_password_file(pool.password_file, "pool.password_file"))
    if pool.password_env:
        if env.get(pool.password_env):
            return Secret(env[pool.password_env])
        raise CredentialsError(f"pool.password_env names {pool.password_env}, which is not set")
    if prompt is not None:
        value = prompt(f"Password for {pool.username}@{url_host(pool.master)}")
        if value:
            return Secret(value)
    raise CredentialsError(
        "no password: set XENCTL_PASSWORD, give --password-file FILE, set pool.password_file "
        "in cloud.yml, or run on a terminal to be prompted")


def _read_password_file(path: Path, where: str) -> str:
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CredentialsError(f"{where}: cannot read {path}: {exc.strerror or exc}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        import logging
        logging.getLogger("xenctl").warning(
            "%s: %s is readable by others; chmod 600 it", where, path)
    lines = text.splitlines()
    # `xe -pwf` style files hold "user\npassword"; a one-line file holds the password only
    value = lines[1] if len(lines) >= 2 and lines[1] else (lines[0] if lines else "")
    if not value:
        raise CredentialsError(f"{where}: {path} is empty")
    return value
