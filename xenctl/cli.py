"""The xenctl command line: parses, calls the library, renders. Nothing else lives here.

Exit codes (terraform's -detailed-exitcode): 0 nothing changed, 2 something changed, 1 error.
Configuration precedence: flag > XENCTL_* / XENSERVER_* environment > cloud.yml > default.
The password is never an argument: XENCTL_PASSWORD, --password-file, pool.password_file in
cloud.yml, or a hidden prompt.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from . import inventory as inv_mod
from .errors import Interrupted, XenctlError
from .nodes import ScalePlan, scale_nodes
from .pool import pool_create, pool_eject, pool_failover, pool_status
from .session import CallStats, Xapi, connect
from .spec import CloudSpec, Secret, load_spec, resolve_password
from .up import UpResult, down, up

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
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (see main)
        raise XenctlClickError(str(Interrupted("interrupted"))) from exc
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
    Typical use on a real pool (see xenctl/README.md and examples/cloud.yml):
      export XENCTL_PASSWORD_FILE=~/.config/medstream/xenserver-password   # chmod 600
      xenctl -c cloud.yml pool create          # name the pool, join the members (idempotent)
      xenctl -c cloud.yml pool status -o json  # master, members, memory, nodes per host
      xenctl -c cloud.yml scale-nodes 30 --dry-run   # print the plan, change nothing
      xenctl -c cloud.yml scale-nodes 30       # desired state: exactly 30 node VMs
      xenctl -c cloud.yml inventory            # inventory/hosts.yml for Ansible
      xenctl up cloud.yml                      # all of the above + Ansible deploy + smoke test
      xenctl up --sim                          # the same on a throwaway simulated pool

    \b
    Settings: a flag beats an XENCTL_* / XENSERVER_* variable, which beats
    cloud.yml, which beats the default. The password is never an argument:
    --password-file, XENCTL_PASSWORD (or XENSERVER_PASSWORD), XENCTL_PASSWORD_FILE,
    pool.password_file / pool.password_env in cloud.yml, or a hidden prompt.

    \b
    TLS is always verified: the system CAs, --ca-file, or pinned SHA-256
    fingerprints (--fingerprint HOST=SHA256, one per host). --insecure turns
    verification off for throwaway labs and says so on every run.

    \b
    Exit codes: 0 nothing changed, 2 something changed, 1 error or interrupted
    (an interrupted run is finished or undone by running the same command again).
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
        return _pool_outcome(res, dry_run, f"pool already formed (master {res.master}); nothing to do")
    _run(go)


@pool.command("status")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: one object with name, uuid, master and hosts[].")
@pass_ctx
def pool_status_cmd(c: Context, output: str) -> None:
    """Show the master and members: live, enabled, API version, memory free / total and the
    cloud's node VMs per host. Read-only; exit 0.

    Any pool host will do as --master: a member redirects (HOST_IS_SLAVE) to the master, and
    when the master is down the members are tried in turn.
    """
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


def _pool_outcome(res: Any, dry_run: bool, nothing: str) -> int:
    """Print a pool command's actions ("would ..." in a dry run), or ``nothing`` when there
    were none; the exit code: changed (only when something really changed) or ok."""
    for a in res.actions:
        click.echo(("would " if dry_run else "") + a)
    if not res.actions:
        click.echo(nothing)
    return EXIT_CHANGED if res.changed and not dry_run else EXIT_OK


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
@click.option("--timeout", default=300.0, show_default=True,
              help="Seconds to wait for the new master to answer.")
@pass_ctx
def pool_failover_cmd(c: Context, to: str | None, emergency: bool, dry_run: bool, yes: bool,
                      timeout: float) -> None:
    """Move the master role to another host.

    \b
    Master alive:  pool.designate_new_master (a planned move, e.g. before
                   maintenance); the pool database moves with it.
    --emergency:   the master is dead. A member takes over from its replica of
                   the database (pool.emergency_transition_to_master), then
                   pool.recover_slaves points the other members at it. Refused
                   while the old master still answers.

    Asks for confirmation unless --yes (or --dry-run).
    """
    def go() -> int:
        spec = c.spec()
        if not dry_run:
            _confirm(yes, "this moves the pool master role" + (" in emergency mode" if emergency else ""))
        res = pool_failover(spec.pool, c.password(), to=to, emergency=emergency, dry_run=dry_run,
                            progress=c.say, stats=c.stats, timeout=timeout)
        return _pool_outcome(res, dry_run, f"{res.master} is already the master; nothing to do")
    _run(go)


@pool.command("eject")
@click.argument("host")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def pool_eject_cmd(c: Context, host: str, dry_run: bool, yes: bool) -> None:
    """Remove HOST (name, address or uuid) from the pool with pool.eject.

    The host reboots as a standalone host and its local storage is lost. Refused for the
    master (move it first with `pool failover --to`) and while VMs run on the host. A host that
    is not in the pool is nothing to do (exit 0).
    """
    def go() -> int:
        x = c.connect()
        try:
            if not dry_run:
                _confirm(yes, f"ejecting {host} wipes its local storage")
            res = pool_eject(x, host, dry_run=dry_run, progress=c.say)
        finally:
            x.logout()
        return _pool_outcome(res, dry_run, f"{host} is not in the pool; nothing to do")
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
@click.option("--placement", type=click.Choice(["spread", "pack"]),
              help="spread: each node on the host with the most free memory (even spread); "
                   "pack: fill one host before the next [XENCTL_PLACEMENT].")
@click.option("--ip-timeout", type=float, help="Seconds to wait for a node's IP [XENCTL_IP_TIMEOUT].")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: the plan, the nodes (name, IP, host) and failures.")
@pass_ctx
def scale_nodes_cmd(c: Context, count: int | None, dry_run: bool, yes: bool, concurrency: int | None,
                    template: str | None, memory: str | None, vcpus: int | None,
                    network: str | None, cidr: str | None, placement: str | None,
                    ip_timeout: float | None, output: str) -> None:
    """Make the node fleet exactly COUNT VMs (desired state; default nodes.count).

    \b
    Nodes are found by other_config tags (xenctl-cloud, xenctl-index), never by
    name. Missing indexes are created, --concurrency at a time: clone the
    template, size it, VIF on the network, VM.start_on the planned host, wait
    (event.from, no polling) for an IP inside nodes.cidr. Indexes above COUNT
    are removed highest first: clean shutdown, hard shutdown after
    nodes.shutdown_timeout, disks destroyed, VM destroyed. Halted nodes are
    started; whatever a killed run left half-built is removed.

    \b
    Refuses, before changing anything, when the pool lacks the memory, and
    names the shortfall. --dry-run prints the plan with read-only calls only.
    Exit 0 nothing changed, 2 changed, 1 error (a re-run converges).
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

    Nodes are the cloud's running VMs with an IP in nodes.cidr (ansible_host = that IP);
    the workstation comes from cloud.yml. The file is rewritten only when it changes
    (exit 2 changed, 0 unchanged).

    \b
    As an Ansible dynamic inventory script (prints JSON, writes nothing):
      XENCTL_CONFIG=cloud.yml xenctl inventory --list
      XENCTL_CONFIG=cloud.yml xenctl inventory --host node-01
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
              help="Run on a throwaway simulated pool (xapisim, 3 hosts, a workstation); "
                   "everything is removed when xenctl exits or is interrupted.")
@click.option("--sim-backend", type=click.Choice(["memory", "lab", "libvirt"]), default="lab",
              show_default=True,
              help="With --sim: lab = every node is a real lab host (network namespace + sshd; "
                   "needs root); libvirt = every node is a real Debian VM under qemu/libvirt "
                   "(systemd, its own kernel; needs root and the image from vagrant/build-box; "
                   "minutes per VM here, see vagrant/README.md); memory = records only (needs "
                   "--skip deploy,smoke).")
@click.option("--nodes", type=click.IntRange(0, 1000), help="Node count (default nodes.count; 5 with --sim).")
@click.option("--skip", default="", metavar="PHASE,...",
              help="Phases to skip: pool, nodes, inventory, deploy, smoke, study.")
@click.option("--study-slices", type=click.IntRange(0, 10000),
              help="After the smoke test, upload a generated CT series of this many 640x640 "
                   "slices from the workstation (default: 360 with --sim, else 0 = no upload).")
@click.option("--inventory", "inventory_path", type=click.Path(dir_okay=False),
              help="Inventory file to write (default inventory/hosts.yml; with --sim a file "
                   "in the simulator's directory, removed on exit).")
@pass_ctx
def up_cmd(c: Context, cloud_yml: str | None, sim: bool, sim_backend: str, nodes: int | None,
           skip: str, study_slices: int | None, inventory_path: str | None) -> None:
    """The whole storage cloud from one command, in phases:

    \b
      pool       pool create (name the pool, join the members, check replicas)
      nodes      scale-nodes to --nodes / nodes.count
      inventory  inventory/hosts.yml from the pool
      deploy     ansible-playbook playbooks/site.yml (daemon on every node,
                 client on the workstation), over SSH
      smoke      a small study uploaded from the workstation and fetched back,
                 every file compared
      study      (--study-slices N) an N-slice CT series uploaded to the nodes

    Each phase prints its progress and a line when it ends. Every phase is idempotent: when
    one fails, xenctl names it and the cause; fix it and run the same command again, finished
    phases report no change. Exit 0 nothing changed, 2 changed, 1 failed or interrupted.

    \b
    xenctl up cloud.yml     a real pool (the password as for every command)
    xenctl up --sim         xapisim with 3 hosts and lab hosts, 5 nodes, Ansible
                            over real SSH, the 360-slice series; nothing is left
                            behind when it ends, fails or gets Ctrl-C / SIGTERM
    """
    skips = {p.strip() for p in skip.split(",") if p.strip()}

    def go() -> int:
        t0 = time.monotonic()
        if sim:
            from .sim import sim_cloud
            if sim_backend == "memory" and not {"deploy", "smoke"} <= skips:
                raise XenctlError("the memory backend has no hosts to deploy to",
                                  hint="use --sim-backend lab, or --skip deploy,smoke")
            # the series goes to deployed nodes: by default only when deploy and smoke run
            slices = study_slices if study_slices is not None else \
                (0 if skips & {"deploy", "smoke", "study"} else 360)
            if sim_backend == "memory":
                slices = 0
            c.say(f"starting xapisim (3 hosts, {sim_backend} backend)")
            try:
                with sim_cloud(5 if nodes is None else nodes, backend=sim_backend) as sc:
                    c.say(f"simulated pool up; its files are in {sc.workdir.parent} "
                          "(removed on exit)")
                    inv = Path(inventory_path) if inventory_path else \
                        sc.workdir / "inventory" / "hosts.yml"
                    res = up(sc.spec, sc.password, inventory_path=inv, skip=skips,
                             progress=c.say, stats=c.stats, deploy=sc.deploy,
                             study_slices=slices)
                    # summarised before the teardown so the node table is still meaningful
                    _print_up(res, t0)
                    c.say("tearing down the simulated pool")
            except Interrupted as exc:
                raise Interrupted(f"{exc.message}; the simulated pool was torn down",
                                  hint="nothing is left behind; run xenctl up --sim again") \
                    from exc
            except KeyboardInterrupt as exc:
                raise Interrupted("interrupted; the simulated pool was torn down",
                                  hint="nothing is left behind; run xenctl up --sim again") \
                    from exc
            c.say("simulated pool removed")
        else:
            if cloud_yml:
                c.config = cloud_yml
            res = up(c.spec(), c.password(), count=nodes,
                     inventory_path=Path(inventory_path or "inventory/hosts.yml"),
                     skip=skips, progress=c.say, stats=c.stats, study_slices=study_slices or 0)
            _print_up(res, t0)
        return EXIT_CHANGED if res.changed else EXIT_OK
    _run(go)


def _print_up(res: UpResult, t0: float) -> None:
    click.echo("\n".join(res.summary()))
    stored = {str(n["node"]): n for n in res.study.get("nodes", [])}
    for n in res.nodes:
        line = f"{n.name}  {n.ip or '-':<15}  {n.host}"
        # transfer labels a node by its name in the workstation's config, else host:port
        st = stored.get(n.name) or (next((v for k, v in stored.items()
                                          if k.startswith(n.ip + ":")), None) if n.ip else None)
        if st:
            line += f"  {st['files']} images, {st['bytes'] / 1e6:.0f} MB, {st['mb_per_s']:.0f} MB/s"
        click.echo(line)
    click.echo(f"done in {time.monotonic() - t0:.1f}s")


@cli.command("down")
@click.argument("cloud_yml", required=False, type=click.Path(dir_okay=False))
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--inventory", "inventory_path", default="inventory/hosts.yml", show_default=True,
              type=click.Path(dir_okay=False), help="Inventory file to rewrite (emptied of nodes).")
@pass_ctx
def down_cmd(c: Context, cloud_yml: str | None, yes: bool, inventory_path: str) -> None:
    """Remove the cloud's node fleet: every node VM (found by its tags) is shut down (clean,
    then hard after nodes.shutdown_timeout) and destroyed with its disks, and the inventory is
    rewritten without nodes. The pool itself stays (`pool eject` takes hosts out).

    Asks for confirmation unless --yes. Exit 2 when nodes were removed, 0 when there were
    none, 1 on error (run it again: it converges).
    """
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


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # stop like Ctrl-C: waits end, sessions are logged out


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    cli.main(prog_name="xenctl")


if __name__ == "__main__":
    main()

