"""Configuration for the node daemon and the workstation client.

Precedence: flag > environment (``TRANSFERD_*``) > TOML file > default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer.errors import ConfigError


@dataclass
class DaemonConfig:
    bind: str = "0.0.0.0"
    port: int = 7370
    erl3d_port: int = 0
    erl3d_allow_other: bool = False
    storage_root: str = "/srv/medstream"
    tls_cert: str = "/etc/medstream/tls/node.crt"
    tls_key: str = "/etc/medstream/tls/node.key"
    client_ca: str = ""
    token_file: str = "/etc/medstream/token"
    insecure_plaintext: bool = False
    max_frame: int = 16 * 1024 * 1024
    max_connections: int = 256
    idle_timeout: float = 60.0
    log_file: str = ""
    node_name: str = ""

    def validate(self) -> DaemonConfig:
        if not 0 <= self.port <= 65535 or not 0 <= self.erl3d_port <= 65535:
            raise ConfigError("port numbers must be between 0 and 65535")
        if not 1024 <= self.max_frame <= 1 << 30:
            raise ConfigError("max_frame must be between 1024 and 1 GiB")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        if self.idle_timeout <= 0:
            raise ConfigError("idle_timeout must be positive")
        if not self.storage_root:
            raise ConfigError("storage_root is required")
        return self


def _coerce(name: str, typ: Any, value: Any, origin: str) -> Any:
    try:
        if typ is bool or typ == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if typ is int or typ == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if typ is float or typ == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {name} has an invalid value {value!r}") from None


def read_toml(path: str | os.PathLike[str], section: str) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fp:
            data = tomllib.load(fp)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {p}: {exc}") from None
    sect = data.get(section, {})
    if not isinstance(sect, dict):
        raise ConfigError(f"config file {p}: [{section}] must be a table")
    return data if section == "" else sect


def load_daemon_config(
    config_file: str | None,
    flags: dict[str, Any],
    environ: dict[str, str] | None = None,
) -> DaemonConfig:
    """Merge file, ``TRANSFERD_*`` environment and flags (None = not given)."""
    env = os.environ if environ is None else environ
    cfg = DaemonConfig()
    fields = {f.name: f.type for f in dataclasses.fields(DaemonConfig)}
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file:
        file_values = read_toml(config_file, "transferd")
        unknown = set(file_values) - set(fields)
        if unknown:
            raise ConfigError(f"config file {config_file}: unknown keys {sorted(unknown)}")
        layers.append((f"config file {config_file}", file_values))
    env_values = {
        name: env[f"TRANSFERD_{name.upper()}"]
        for name in fields
        if f"TRANSFERD_{name.upper()}" in env
    }
    layers.append(("environment", env_values))
    layers.append(
        ("command line", {k: v for k, v in flags.items() if v is not None and k in fields})
    )
    for origin, values in layers:
        for name, value in values.items():
            setattr(cfg, name, _coerce(name, fields[name], value, origin))
    return cfg.validate()


@dataclass(frozen=True)
class NodeAddr:
    host: str
    port: int
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"{self.host}:{self.port}"

    @property
    def key(self) -> str:
        """What placement hashes: stable across runs for the same node."""
        return self.name or f"{self.host}:{self.port}"


def parse_node(text: str, default_port: int = 7370) -> NodeAddr:
    """``host:port``, ``[v6]:port``, ``host`` or ``name=host:port``."""
    name = ""
    if "=" in text:
        name, text = text.split("=", 1)
    text = text.strip()
    if not text:
        raise ConfigError("empty node address")
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"bad node address {text!r}")
        host = text[1:end]
        if text[end + 1 :].startswith(":"):
            port = int(text[end + 2 :]) if text[end + 2 :].isdigit() else -1
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = int(p) if p.isdigit() else -1
    if not 0 < port <= 65535 or not host:
        raise ConfigError(f"bad node address {text!r} (expected host:port)")
    return NodeAddr(host=host, port=port, name=name.strip())


@dataclass
class ClientConfig:
    ca_file: str = ""
    token_file: str = ""
    connections_per_node: int = 4
    max_connections: int = 16  # all nodes together; at least one per node
    replicas: int = 1
    nodes: list[NodeAddr] = field(default_factory=list)
    source: str = ""  # which file it came from


def default_client_config_path() -> Path | None:
    env = os.environ.get("MEDSTREAM_TRANSFER_CONFIG")
    if env:
        return Path(env)
    for cand in (
        Path.home() / ".config/medstream/transfer.toml",
        Path("/etc/medstream/transfer.toml"),
    ):
        if cand.is_file():
            return cand
    return None


def load_client_config(path: str | os.PathLike[str] | None) -> ClientConfig:
    p = Path(path) if path else default_client_config_path()
    cfg = ClientConfig()
    if p is None:
        return cfg
    data = read_toml(p, "")
    sect = data.get("transfer", {})
    if not isinstance(sect, dict):
        raise ConfigError(f"config file {p}: [transfer] must be a table")
    for key in ("ca_file", "token_file"):
        if key in sect:
            setattr(cfg, key, str(sect[key]))
    for key in ("connections_per_node", "max_connections", "replicas"):
        if key in sect:
            setattr(cfg, key, _coerce(key, int, sect[key], f"config file {p}"))
    for i, n in enumerate(data.get("nodes", []) or []):
        if not isinstance(n, dict) or "host" not in n:
            raise ConfigError(f"config file {p}: nodes[{i}] needs a host")
        cfg.nodes.append(
            NodeAddr(
                host=str(n["host"]),
                port=_coerce("port", int, n.get("port", 7370), f"config file {p}"),
                name=str(n.get("name", "")),
            )
        )
    cfg.source = str(p)
    return cfg
