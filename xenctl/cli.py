"""The xenctl command line: parses, calls the library, renders. Nothing else lives here.

Exit codes (terraform's -detailed-exitcode): 0 nothing changed, 2 something changed, 1 error.
Configuration precedence: flag > XENCTL_* / XENSERVER_* environment > cloud.yml > default.
The password is never an argument: XENCTL_PASSWORD, --password-file, pool.password_file in
cloud.yml, or a hidden prompt.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import click

from . import inventory as inv_mod
from .errors import XenctlError
from .nodes import ScalePlan, scale_nodes
from .pool import pool_create, pool_eject, pool_failover, pool_status
from .session import CallStats, Xapi, connect
from .spec import CloudSpec, Secret, load_spec, resolve_password

__all__ = ["cli", "main"]

EXIT_OK, EXIT_ERROR, EXIT_CHANGED = 0, 1, 2


class XenctlClickError(click.ClickException):
    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"xenctl: error: {self.format_message()}", err=True)


@dataclass
class Context:
    config: str | None
    overrides: dict[str, Any]
    password_file: str | None
    verbose: int
    stats: CallStats = field(default_factory=CallStats)
    _spec: CloudSpec | None = None
    _password: Secret | None = None
    t0: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spec(self, **extra: Any) -> CloudSpec:
        if self._spec is None or extra:
            self._spec = load_spec(self.config, overrides={**self.overrides, **extra})
        return self._spec

    def password(self) -> Secret:
        if self._password is None:
            spec = self.spec()
            prompt = None
            if sys.stdin.isatty():
                def prompt(text: str) -> str:
                    return str(click.prompt(text, hide_input=True, err=True))
            self._password = resolve_password(spec.pool, password_file=self.password_file,
                                              prompt=prompt)
        return self._password

    def connect(self) -> Xapi:
        return connect(self.spec().pool, self.password(), stats=self.stats)

    def say(self, text: str) -> None:
        with self.lock:
            click.echo(f"[{time.monotonic() - self.t0:6.1f}s] {text}", err=True)


pass_ctx = click.make_pass_decorator(Context)


def _run(fn: Callable[[], int]) -> NoReturn:
    try:
        code = fn()
    except XenctlError as exc:
        raise XenctlClickError(str(exc)) from exc
    sys.exit(code)


def _default_config() -> str | None:
    return "cloud.yml" if Path("cloud.yml").is_file() else None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-c", "--config", envvar="XENCTL_CONFIG", type=click.Path(dir_okay=False),
              default=None, help="cloud.yml to read (default: ./cloud.yml if present).")
@click.option("--master", help="Pool master: HOST, HOST:PORT or https://HOST[:PORT] [XENCTL_MASTER].")
@click.option("--username", help="XenAPI user (default root) [XENCTL_USERNAME].")
@click.option("--password-file", type=click.Path(dir_okay=False),
              help="File holding the password (or 'user\\npassword', like xe -pwf). "
                   "Else XENCTL_PASSWORD, pool.password_file, or a hidden prompt.")
@click.option("--ca-file", type=click.Path(dir_okay=False),
              help="Verify the pool's certificates against this CA [XENCTL_CA_FILE].")
@click.option("--fingerprint", "fingerprints", multiple=True, metavar="[HOST=]SHA256",
              help="Pin a host's certificate SHA-256 fingerprint (repeatable) [XENCTL_FINGERPRINTS].")
@click.option("--insecure", is_flag=True, default=None,
              help="Do NOT verify TLS certificates (throwaway labs only; warns loudly).")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, config: str | None, master: str | None, username: str | None,
        password_file: str | None, ca_file: str | None, fingerprints: tuple[str, ...],
        insecure: bool | None, verbose: int) -> None:
    """xenctl: form a XenServer / XCP-ng pool and run a fleet of storage node VMs on it.

    \b
    Typical use:
      export XENCTL_PASSWORD_FILE=~/.xenctl-pw      # never put the password on the command line
      xenctl -c cloud.yml pool create               # name the pool, join the members
      xenctl -c cloud.yml scale-nodes 30            # desired state: exactly 30 nodes
      xenctl -c cloud.yml inventory                 # inventory/hosts.yml for Ansible

    Exit codes: 0 nothing changed, 2 changed, 1 error.
    """
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2),
                        format="xenctl: %(levelname)s: %(message)s", stream=sys.stderr)
    overrides: dict[str, Any] = {"pool.master": master, "pool.username": username,
                                 "pool.tls.ca_file": ca_file, "pool.tls.insecure": insecure}
    if fingerprints:
        overrides["pool.tls.fingerprints"] = ",".join(fingerprints)
    ctx.obj = Context(config if config is not None else _default_config(), overrides,
                      password_file, verbose)


# ------------------------------------------------------------------------------- pool

@cli.group()
def pool() -> None:
    """Form and look after the pool (create, status, failover, eject)."""


@pool.command("create")
@click.option("--name", help="Pool name_label (default: pool.name in cloud.yml).")
@click.option("--members", help="Comma-separated member hosts (default: pool.members).")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@click.option("--timeout", default=300.0, show_default=True,
              help="Seconds to wait for joined hosts to come up.")
@pass_ctx
def pool_create_cmd(c: Context, name: str | None, members: str | None, dry_run: bool,
                    timeout: float) -> None:
    """Name the pool on the master and have each member pool.join it (idempotent).

    Waits until every host is live and enabled, syncs the pool database and checks each
    member's replica with a local login.
    """
    def go() -> int:
        spec = c.spec(**{"pool.name": name, "pool.members": members})
        res = pool_create(spec.pool, c.password(), dry_run=dry_run, progress=c.say,
                          stats=c.stats, join_timeout=timeout)
        for a in res.actions:
            click.echo(("would " if dry_run else "") + a)
        if not res.actions:
            click.echo(f"pool already formed (master {res.master}); nothing to do")
        return EXIT_CHANGED if res.changed and not dry_run else EXIT_OK
    _run(go)


@pool.command("status")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@pass_ctx
def pool_status_cmd(c: Context, output: str) -> None:
    """Show the master and members: live, API version, memory, node VMs per host."""
    def go() -> int:
        x = c.connect()
        try:
            st = pool_status(x, c.spec().cloud)
        finally:
            x.logout()
        if output == "json":
            click.echo(json.dumps(st.to_json(), indent=2))
        else:
            click.echo("\n".join(st.render()))
        return EXIT_OK
    _run(go)


def _confirm(yes: bool, what: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise XenctlClickError(f"{what}: needs --yes when not run from a terminal")
    click.confirm(f"{what}. Continue?", abort=True, err=True)


@pool.command("failover")
@click.option("--to", "to", metavar="HOST", help="Host to become master (default: first live member).")
@click.option("--emergency", is_flag=True,
              help="The master is dead: promote a member from its database replica and recover "
                   "the others (pool.emergency_transition_to_master + pool.recover_slaves).")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--timeout", default=300.0, show_default=True)
@pass_ctx
def pool_failover_cmd(c: Context, to: str | None, emergency: bool, dry_run: bool, yes: bool,
                      timeout: float) -> None:
    """Move the master role (pool.designate_new_master), or take over after the master died."""
    def go() -> int:
        spec = c.spec()
        if not dry_run:
            _confirm(yes, "this moves the pool master role" + (" in emergency mode" if emergency else ""))
        res = pool_failover(spec.pool, c.password(), to=to, emergency=emergency, dry_run=dry_run,
                            progress=c.say, stats=c.stats, timeout=timeout)
        for a in res.actions:
            click.echo(("would " if dry_run else "") + a)
        if not res.actions:
            click.echo(f"{res.master} is already the master; nothing to do")
        return EXIT_CHANGED if res.changed and not dry_run else EXIT_OK
    _run(go)


@pool.command("eject")
@click.argument("host")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def pool_eject_cmd(c: Context, host: str, dry_run: bool, yes: bool) -> None:
    """Remove HOST from the pool (it reboots standalone; its local storage is lost)."""
    def go() -> int:
        x = c.connect()
        try:
            if not dry_run:
                _confirm(yes, f"ejecting {host} wipes its local storage")
            res = pool_eject(x, host, dry_run=dry_run, progress=c.say)
        finally:
            x.logout()
        for a in res.actions:
            click.echo(("would " if dry_run else "") + a)
        if not res.actions:
            click.echo(f"{host} is not in the pool; nothing to do")
        return EXIT_CHANGED if res.changed and not dry_run else EXIT_OK
    _run(go)


# ------------------------------------------------------------------------------- nodes

@cli.command("scale-nodes")
@click.argument("count", type=click.IntRange(0, 1000), required=False)
@click.option("--dry-run", is_flag=True, help="Print the plan; make no mutating call.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask before removing nodes.")
@click.option("--concurrency", type=click.IntRange(1, 64),
              help="VMs built at once (default nodes.concurrency, 10) [XENCTL_CONCURRENCY].")
@click.option("--template", help="Template to clone [XENCTL_TEMPLATE].")
@click.option("--memory", help="Memory per node, e.g. 1GiB [XENCTL_MEMORY].")
@click.option("--vcpus", type=int, help="vCPUs per node [XENCTL_VCPUS].")
@click.option("--network", help="Network (name_label, bridge or uuid) [XENCTL_NETWORK].")
@click.option("--cidr", help="The node IP must fall in this CIDR [XENCTL_CIDR].")
@click.option("--placement", type=click.Choice(["spread", "pack"]), help="[XENCTL_PLACEMENT]")
@click.option("--ip-timeout", type=float, help="Seconds to wait for a node's IP [XENCTL_IP_TIMEOUT].")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@pass_ctx
def scale_nodes_cmd(c: Context, count: int | None, dry_run: bool, yes: bool, concurrency: int | None,
                    template: str | None, memory: str | None, vcpus: int | None,
                    network: str | None, cidr: str | None, placement: str | None,
                    ip_timeout: float | None, output: str) -> None:
    """Make the node fleet exactly COUNT VMs (desired state; default nodes.count).

    Creates the missing indexes (clone, size, VIF, start on the planned host, wait for the IP),
    removes the highest indexes above COUNT (clean then hard shutdown, disks destroyed), and
    cleans up whatever an interrupted run left. Refuses before changing anything when the pool
    lacks memory.
    """
    def go() -> int:
        spec = c.spec(**{"nodes.count": count, "nodes.concurrency": concurrency,
                         "nodes.template": template, "nodes.memory": memory,
                         "nodes.vcpus": vcpus, "nodes.network": network, "nodes.cidr": cidr,
                         "nodes.placement": placement, "nodes.ip_timeout": ip_timeout})
        want = spec.nodes.count if count is None else count
        x = c.connect()

        def on_plan(plan: ScalePlan) -> None:
            if output == "text":
                click.echo("\n".join(plan.describe()))
            removals = [s for s in plan.steps if s.action == "remove"]
            if removals and not dry_run:
                _confirm(yes, f"{len(removals)} node(s) and their disks will be destroyed")

        try:
            res = scale_nodes(x, spec, want, dry_run=dry_run,
                              progress=lambda n, w: c.say(f"{n}: {w}"), plan_hook=on_plan)
        finally:
            x.logout()
        if output == "json":
            click.echo(json.dumps(res.to_json(), indent=2))
        else:
            for n in res.nodes:
                click.echo(f"{n.name}  {n.ip or '-':<15}  {n.host}")
            for f in res.failures:
                click.echo(f"FAILED {f.name}: {f.error}", err=True)
            c.say(f"done in {res.elapsed:.1f}s, {res.calls} XenAPI calls")
        if res.failures:
            raise XenctlError(f"{len(res.failures)} node(s) failed; rerun to converge")
        if dry_run:
            return EXIT_OK
        return EXIT_CHANGED if res.changed else EXIT_OK
    _run(go)


# ------------------------------------------------------------------------------- inventory

@cli.command("inventory")
@click.option("--write", "path", default="inventory/hosts.yml", show_default=True,
              type=click.Path(dir_okay=False), help="File to write.")
@click.option("--list", "as_list", is_flag=True, help="Ansible dynamic inventory: print all as JSON.")
@click.option("--host", "host", help="Ansible dynamic inventory: print one host's vars.")
@pass_ctx
def inventory_cmd(c: Context, path: str, as_list: bool, host: str | None) -> None:
    """Write the Ansible inventory (groups nodes, workstation) from the pool.

    With --list / --host it is an Ansible dynamic inventory script (configure it with
    XENCTL_CONFIG and the password variables).
    """
    def go() -> int:
        spec = c.spec()
        x = c.connect()
        try:
            inv = inv_mod.build_inventory(x, spec)
        finally:
            x.logout()
        if as_list:
            click.echo(json.dumps(inv_mod.dynamic_list(inv), indent=2))
            return EXIT_OK
        if host is not None:
            click.echo(json.dumps(inv_mod.dynamic_host(inv, host), indent=2))
            return EXIT_OK
        changed = inv_mod.write_inventory(inv, path)
        click.echo(f"{path}: {len(inv['nodes'])} node(s), {len(inv['workstation'])} workstation"
                   + ("" if changed else " (unchanged)"))
        return EXIT_CHANGED if changed else EXIT_OK
    _run(go)


# ------------------------------------------------------------------------------- up / down

@cli.command("up")
@click.argument("cloud_yml", required=False, type=click.Path(dir_okay=False))
@click.option("--sim", is_flag=True,
              help="Run on a throwaway simulated pool (xapisim, 3 hosts); nothing is left behind.")
@click.option("--sim-backend", type=click.Choice(["memory", "lab"]), default="lab",
              show_default=True,
              help="With --sim: real lab hosts with sshd (needs root), or records only "
                   "(memory: no deploy or smoke possible).")
@click.option("--nodes", type=click.IntRange(0, 1000), help="Node count (default nodes.count; 5 with --sim).")
@click.option("--skip", default="", metavar="PHASE,...",
              help="Phases to skip: pool, nodes, inventory, deploy, smoke.")
@click.option("--study-slices", type=click.IntRange(0, 10000),
              help="After the smoke test, upload a generated CT series of this many 640x640 "
                   "slices from the workstation (default: 360 with --sim, else 0 = no upload).")
@click.option("--inventory", "inventory_path", default="inventory/hosts.yml", show_default=True,
              type=click.Path(dir_okay=False))
@pass_ctx
def up_cmd(c: Context, cloud_yml: str | None, sim: bool, sim_backend: str, nodes: int | None,
           skip: str, study_slices: int | None, inventory_path: str) -> None:
    """The whole storage cloud from one command: pool create, scale-nodes, inventory,
    ansible-playbook playbooks/site.yml, smoke test. Re-run to resume after a failure."""
    from .up import up

    skips = {p.strip() for p in skip.split(",") if p.strip()}

    def go() -> int:
        t0 = time.monotonic()
        if sim:
            from .sim import sim_cloud
            if sim_backend == "memory" and not {"deploy", "smoke"} <= skips:
                raise XenctlError("the memory backend has no hosts to deploy to",
                                  hint="use --sim-backend lab, or --skip deploy,smoke")
            slices = 360 if study_slices is None else study_slices
            if sim_backend == "memory":
                slices = 0
            with sim_cloud(5 if nodes is None else nodes, backend=sim_backend) as sc:
                res = up(sc.spec, sc.password, inventory_path=Path(inventory_path), skip=skips,
                         progress=c.say, stats=c.stats, deploy=sc.deploy, study_slices=slices)
        else:
            if cloud_yml:
                c.config = cloud_yml
            res = up(c.spec(), c.password(), count=nodes, inventory_path=Path(inventory_path),
                     skip=skips, progress=c.say, stats=c.stats, study_slices=study_slices or 0)
        click.echo("\n".join(res.summary()))
        stored = {str(n["node"]): n for n in res.study.get("nodes", [])}
        for n in res.nodes:
            line = f"{n.name}  {n.ip or '-':<15}  {n.host}"
            st = next((v for k, v in stored.items() if k.startswith(n.ip + ":")), None) if n.ip else None
            if st:
                line += f"  {st['files']} images, {st['bytes'] / 1e6:.0f} MB, {st['mb_per_s']:.0f} MB/s"
            click.echo(line)
        click.echo(f"done in {time.monotonic() - t0:.1f}s")
        return EXIT_CHANGED if res.changed else EXIT_OK
    _run(go)


@cli.command("down")
@click.argument("cloud_yml", required=False, type=click.Path(dir_okay=False))
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--inventory", "inventory_path", default="inventory/hosts.yml", show_default=True,
              type=click.Path(dir_okay=False))
@pass_ctx
def down_cmd(c: Context, cloud_yml: str | None, yes: bool, inventory_path: str) -> None:
    """Remove the node fleet (VMs and their disks) and empty the inventory; the pool stays."""
    from .up import down

    def go() -> int:
        if cloud_yml:
            c.config = cloud_yml
        spec = c.spec()
        _confirm(yes, f"all nodes of cloud {spec.cloud!r} and their disks will be destroyed")
        res = down(spec, c.password(), inventory_path=Path(inventory_path), progress=c.say,
                   stats=c.stats)
        click.echo("\n".join(res.summary()))
        return EXIT_CHANGED if res.changed else EXIT_OK
    _run(go)


def main() -> None:
    cli.main(prog_name="xenctl")


if __name__ == "__main__":
    main()

