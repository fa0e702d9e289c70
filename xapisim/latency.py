"""The latency model: how long each message takes, and when a started guest reports its IP.

Keys are wire names without ``Async.`` (``"VM.clone"``), plus two pseudo-keys: ``guest_ip``
(seconds from VM.start finishing to the guest agent reporting its address) and ``auth_failure``
(xapi's ~5 s delay before SESSION_AUTHENTICATION_FAILED). ``scale`` multiplies everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

REALISTIC: dict[str, float] = {
    "VM.clone": 2.0,
    "VM.copy": 10.0,
    "VM.provision": 1.0,
    "VM.start": 5.0,
    "VM.start_on": 5.0,
    "VM.clean_shutdown": 3.0,
    "VM.hard_shutdown": 1.0,
    "VM.shutdown": 3.0,
    "VM.destroy": 0.5,
    "VM.pool_migrate": 4.0,
    "VDI.create": 0.5,
    "VDI.destroy": 0.5,
    "pool.join": 5.0,
    "pool.eject": 5.0,
    "pool.designate_new_master": 3.0,
    "pool.emergency_transition_to_master": 2.0,
    "guest_ip": 10.0,
    "auth_failure": 5.0,
}
PROFILES: dict[str, dict[str, float]] = {"none": {}, "realistic": REALISTIC}


@dataclass
class LatencyModel:
    delays: dict[str, float] = field(default_factory=dict)
    scale: float = 1.0

    def delay(self, key: str) -> float:
        if key.startswith("Async."):
            key = key[len("Async."):]
        return max(0.0, self.delays.get(key, 0.0) * self.scale)

    @property
    def guest_ip(self) -> float:
        return self.delay("guest_ip")

    @classmethod
    def from_config(cls, value: object) -> LatencyModel:
        """None -> no delays; a profile name; or {profile?, scale?, delays?: {key: seconds}}."""
        if value is None:
            return cls()
        if isinstance(value, LatencyModel):
            return value
        if isinstance(value, str):
            if value not in PROFILES:
                raise ConfigError(f"unknown latency profile {value!r}; choose one of {', '.join(PROFILES)}")
            return cls(dict(PROFILES[value]))
        if isinstance(value, dict):
            profile = value.get("profile", "none")
            if profile not in PROFILES:
                raise ConfigError(f"unknown latency profile {profile!r}")
            delays = dict(PROFILES[profile])
            extra = value.get("delays", {}) or {}
            if not isinstance(extra, dict):
                raise ConfigError("latency.delays must be a mapping of message name to seconds")
            for k, v in extra.items():
                try:
                    delays[str(k)] = float(v)
                except (TypeError, ValueError):
                    raise ConfigError(f"latency delay for {k!r} is not a number: {v!r}") from None
            try:
                scale = float(value.get("scale", 1.0))
            except (TypeError, ValueError):
                raise ConfigError("latency.scale must be a number") from None
            return cls(delays, scale)
        raise ConfigError(f"latency must be a profile name or a mapping, not {type(value).__name__}")
