"""``xapisim``: run the simulator from the command line (thin: parse, call, render)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from .errors import XapisimError
from .server import SimConfig, SimServer


@click.group(help="A XenAPI server that behaves like a XenServer/XCP-ng pool (medstream's xapisim).")
def main() -> None:
    pass


@main.command(help="Start N standalone simulated hosts and serve XenAPI until SIGINT/SIGTERM.\n\n"
              "Each host listens on its own loopback address (127.<a>.<b>.N), all on one port, over "
              "HTTPS with a generated CA. The credentials file (mode 0600, JSON: username, password, "
              "ca_file, hosts with url and certificate fingerprint) is removed on exit, with every "
              "certificate and guest the simulator made.")
@click.option("--hosts", "hosts", type=click.IntRange(1, 250), default=None, help="number of hosts [3]")
@click.option("--backend", type=click.Choice(["memory", "lab", "libvirt"]), default=None,
              help="what a started VM is: 'memory' (records, synthetic IPs) or 'lab' (network "
                   "namespaces with sshd) [memory]")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file with SimConfig keys (latency, faults, host_memory, ...); flags win")
@click.option("--latency", default=None, help="latency profile: none | realistic")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="port on every host address [any]")
@click.option("--address-prefix", default=None, help="e.g. 127.0.10 -> hosts at 127.0.10.1..N")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="directory for certificates and the credentials file [a temp dir]")
@click.option("--no-tls", is_flag=True, help="plain HTTP (not what real hosts do)")
@click.option("--sync-interval", type=float, default=None, help="seconds between DB syncs to slaves [5]")
@click.option("--join", "join", is_flag=True,
              help="join every other host to host-1 at start (via pool.join, as a client would)")
@click.option("--guest-cidr", default=None,
              help="memory backend: where synthetic guest IPs come from [10.213.128.0/17]")
def serve(hosts: int | None, backend: str | None, config_file: str | None, latency: str | None,
          port: int | None, address_prefix: str | None, workdir: str | None, no_tls: bool,
          sync_interval: float | None, join: bool, guest_cidr: str | None) -> None:
    overrides: dict[str, Any] = {"hosts": hosts, "backend": backend, "latency": latency, "port": port,
                 "address_prefix": address_prefix, "workdir": workdir,
                 "sync_interval": sync_interval, "tls": False if no_tls else None}
    try:
        if config_file:
            cfg = SimConfig.from_file(config_file, **overrides)
        else:
            cfg = SimConfig(**{k: v for k, v in overrides.items() if v is not None})
        if guest_cidr:
            if cfg.backend != "memory":
                raise ValueError("--guest-cidr applies to the memory backend only")
            cfg.backend_options["cidr"] = guest_cidr
        sim = SimServer(cfg)
        sim.start()
    except (XapisimError, ValueError, OSError) as e:
        click.echo(f"xapisim: error: {e}", err=True)
        sys.exit(1)
    try:
        if join:
            sim.join_all()
    except Exception as e:  # XenAPI.Failure or a connection error: report, clean up, fail
        sim.stop()
        click.echo(f"xapisim: error: {e}", err=True)
        sys.exit(1)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        shape = f"a pool of {len(sim.hosts)} (master host-1)" if join else f"{len(sim.hosts)} standalone hosts"
        click.echo(f"xapisim: {shape}, backend {sim.backend.name}, "
                   f"port {sim.port}, {'HTTPS' if sim.config.tls else 'HTTP'}")
        for h in sim.hosts:
            fp = sim.fingerprints.get(h.name, "")
            click.echo(f"  {h.name:10} {sim.url_for(h.name):32} uuid {h.uuid}" + (f"\n{'':13}sha256 {fp}" if fp else ""))
        click.echo(f"credentials: {sim.credentials_file}")
        if sim.ca_file:
            click.echo(f"CA file:     {sim.ca_file}")
        for key in ("ssh_config", "private_key"):
            value = getattr(sim.backend, key, None)
            if value:
                click.echo(f"{key + ':':12} {value}")
        click.echo("join a pool: pool.join(master_address, username, password) on each other host; "
                   "Ctrl-C stops and removes everything.", err=False)
        sys.stdout.flush()
        while not stop.wait(1.0):
            pass
    finally:
        click.echo("xapisim: stopping", err=True)
        sim.stop()


@main.command(help="Regenerate xapisim/COVERAGE.md (with --check: fail if it is out of date).")
@click.option("--check", is_flag=True)
def coverage(check: bool) -> None:
    from .coverage import render
    path = Path(__file__).with_name("COVERAGE.md")
    text = render()
    if check:
        if not path.exists() or path.read_text() != text:
            click.echo("xapisim/COVERAGE.md is out of date: run `xapisim coverage`", err=True)
            sys.exit(1)
        click.echo("COVERAGE.md is current")
        return
    path.write_text(text)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
