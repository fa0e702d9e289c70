"""``transfer``: the workstation client (thin click layer over :mod:`transfer.client`)."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from transfer import client as lib
from transfer.config import ClientConfig, NodeAddr, load_client_config, parse_node
from transfer.errors import TransferError

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _errors(fn: F) -> F:
    """Expected errors print one line and exit 1; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TransferError as exc:
            click.echo(f"transfer: error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:  # a local file we were told to read or write
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"transfer: error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("transfer: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def node_options(fn: F) -> F:
    opts = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="Client TOML (default: $MEDSTREAM_TRANSFER_CONFIG, ~/.config/medstream/transfer.toml, /etc/medstream/transfer.toml).",
        ),
        click.option(
            "--nodes", help="Comma-separated host:port list (overrides the config's [[nodes]])."
        ),
        click.option("--ca-file", help="CA that node certificates must chain to."),
        click.option("--token-file", help="File holding the token the nodes expect."),
        click.option(
            "--cert", "client_cert", help="Client certificate (for nodes that require mutual TLS)."
        ),
        click.option("--key", "client_key", help="Client private key."),
        click.option(
            "--insecure-plaintext",
            is_flag=True,
            help="No TLS, no token (only for nodes started the same way).",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _resolve(
    config_file: str | None,
    nodes: str | None,
    ca_file: str | None,
    token_file: str | None,
    client_cert: str | None,
    client_key: str | None,
    insecure_plaintext: bool,
) -> tuple[ClientConfig, list[NodeAddr], lib.Credentials]:
    cfg = load_client_config(config_file)
    addrs = [parse_node(n) for n in nodes.split(",") if n.strip()] if nodes else list(cfg.nodes)
    if not addrs:
        raise TransferError("no nodes: pass --nodes host:port,... or list [[nodes]] in the config")
    if insecure_plaintext:
        return cfg, addrs, lib.Credentials.plaintext()
    ca = ca_file or cfg.ca_file
    tok = token_file or cfg.token_file
    if not ca:
        raise TransferError(
            "TLS needs --ca-file (or ca_file in the config); --insecure-plaintext to skip"
        )
    if not tok:
        raise TransferError("no token: pass --token-file (or token_file in the config)")
    ctx = lib.client_ssl_context(ca, client_cert or "", client_key or "")
    return cfg, addrs, lib.Credentials(ctx, lib.read_token(tok))


@click.group(context_settings=CONTEXT)
def cli() -> None:
    """transfer: move DICOM studies into medstream storage nodes, and get them back.

    Nodes are reached over TLS with a shared token; each object is placed by rendezvous hashing
    of its SOP Instance UID, so the same object always goes to the same node(s).
    """


@cli.command(context_settings=CONTEXT)
@click.argument("directory", type=click.Path(exists=True))
@node_options
@click.option(
    "--protocol",
    type=click.Choice(["native", "erl3d"]),
    default="native",
    show_default=True,
    help="erl3d = the 2013 wire format (plaintext, one file per connection; give the nodes' erl3d ports).",
)
@click.option(
    "--zstd", is_flag=True, help="Compress bodies with zstd level 1 (CT compresses about 2x)."
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    help="Copies of each object on distinct nodes, chosen by rendezvous hashing of the SOP "
    "Instance UID (default 1 or the config's).",
)
@click.option(
    "--connections",
    type=click.IntRange(1, 64),
    help="Parallel connections per node (default 4 or the config's), lowered when needed to "
    "keep within --max-connections.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, 1024),
    help="Connections to all nodes together (default 16 or the config's), but at least one per "
    "node: with many nodes each gets one connection, which fills a link as well and saves "
    "handshakes and memory.",
)
@click.option(
    "--retries",
    type=click.IntRange(0, 20),
    default=4,
    show_default=True,
    help="Reconnect attempts per connection and resends per file, with exponential backoff "
    "(0.2 s doubling, at most 5 s).",
)
@click.option(
    "--memory-budget",
    type=click.IntRange(2, 4096),
    default=32,
    show_default=True,
    help="MiB of file data read ahead and in flight at once, shared by all nodes and "
    "connections (the uploader's memory bound; files go in chunks of 64 KiB to 1 MiB).",
)
@click.option(
    "--allow-other", is_flag=True, help="Also upload non-DICOM files (stored by content hash)."
)
@click.option("--no-resume", is_flag=True, help="Do not ask the nodes what they already hold.")
@click.option(
    "--json-report", type=click.Path(dir_okay=False), help="Write the summary as JSON here."
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
@_errors
def upload(
    directory: str,
    protocol: str,
    zstd: bool,
    replicas: int | None,
    connections: int | None,
    max_connections: int | None,
    retries: int,
    memory_budget: int,
    allow_other: bool,
    no_resume: bool,
    json_report: str | None,
    progress: bool | None,
    **node_opts: Any,
) -> None:
    """Upload every file under DIRECTORY (validated as DICOM) to the nodes.

    A re-run sends only what the nodes do not already hold. Exits 1 if anything was not stored.
    """
    if protocol == "erl3d":
        if zstd:
            raise TransferError("--zstd is not part of the erl3d format (it sends raw files)")
        node_opts["insecure_plaintext"] = True
    if json_report and not Path(json_report).resolve().parent.is_dir():
        raise TransferError(f"--json-report: directory {Path(json_report).parent} does not exist")
    cfg, addrs, creds = _resolve(**node_opts)
    reps = replicas if replicas is not None else cfg.replicas
    if not 1 <= reps <= len(addrs):
        raise TransferError(f"--replicas must be between 1 and the number of nodes ({len(addrs)})")
    report = lib.upload_dir(
        directory,
        addrs,
        creds,
        allow_other=allow_other,
        show_progress=sys.stderr.isatty() if progress is None else progress,
        replicas=reps,
        connections_per_node=connections or cfg.connections_per_node,
        max_connections=max_connections or cfg.max_connections,
        compression="zstd" if zstd else "none",
        protocol=protocol,
        retries=retries,
        resume=not no_resume,
        budget=memory_budget << 20,
    )
    d = report.as_dict()
    if json_report:
        Path(json_report).write_text(json.dumps(d, indent=2) + "\n")
    click.echo(
        f"{'node':<24} {'files':>6} {'already':>7} {'failed':>6} {'MB':>9} {'s':>7} {'MB/s':>8}"
    )
    for n in d["nodes"]:
        click.echo(
            f"{n['node']:<24} {n['files']:>6} {n['already']:>7} {n['failed']:>6} "
            f"{n['bytes'] / 1e6:>9.1f} {n['seconds']:>7.2f} {n['mb_per_s']:>8.1f}"
        )
    t = d["total"]
    click.echo(
        f"{'total':<24} {t['files']:>6} {t['already']:>7} {t['failed']:>6} "
        f"{t['bytes'] / 1e6:>9.1f} {d['seconds']:>7.2f} {t['mb_per_s']:>8.1f}"
    )
    for r in d["rejected"]:
        click.echo(f"rejected {r['name']}: {r['reason']}", err=True)
    for f in d["failed"][:50]:
        click.echo(f"not stored {f['name']} on {f['node']}: {f['reason']}", err=True)
    if not report.ok:
        click.echo(
            f"transfer: {len(d['failed'])} not stored, {len(d['rejected'])} rejected "
            "(re-run to send only what is missing)",
            err=True,
        )
        sys.exit(1)


@cli.command(name="ls", context_settings=CONTEXT)
@node_options
@click.option("--study", help="Only this Study Instance UID.")
@click.option("--series", help="Only this Series Instance UID.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def ls_cmd(study: str | None, series: str | None, as_json: bool, **node_opts: Any) -> None:
    """List what the nodes hold, one instance per line.

    Columns (tab-separated): node, Study Instance UID, Series Instance UID, SOP Instance UID,
    size in bytes; non-DICOM objects show `other`, their SHA-256 and original name instead.
    Exits 1 if a node could not be asked.
    """
    _, addrs, creds = _resolve(**node_opts)
    res = asyncio.run(lib.list_nodes(addrs, creds, study=study, series=series))
    if as_json:
        click.echo(json.dumps(res, indent=2))
    bad = False
    for node, rows in res.items():
        if isinstance(rows, str):
            click.echo(f"transfer: error: {rows}", err=True)
            bad = True
            continue
        if as_json:
            continue
        for r in rows:
            if r["kind"] == "dicom":
                click.echo(f"{node}\t{r['study']}\t{r['series']}\t{r['sop']}\t{r['size']}")
            else:
                click.echo(f"{node}\tother\t{r['sha256']}\t{r['name']}\t{r['size']}")
    if bad:
        sys.exit(1)


@cli.command(context_settings=CONTEXT)
@click.argument("sop", required=False)
@click.option("--sha256", help="A non-DICOM object by content hash.")
@node_options
@_errors
def stat(sop: str | None, sha256: str | None, **node_opts: Any) -> None:
    """Show where an instance (SOP Instance UID) or object (--sha256) is stored."""
    if not sop and not sha256:
        raise TransferError("give a SOP Instance UID or --sha256")
    _, addrs, creds = _resolve(**node_opts)
    click.echo(
        json.dumps(asyncio.run(lib.stat_object(addrs, creds, sop=sop, sha256=sha256)), indent=2)
    )


@cli.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--study", help="Every instance of this study.")
@click.option("--series", help="Every instance of this series.")
@click.option("--sop", help="One instance.")
@click.option("--all", "everything", is_flag=True, help="Everything the nodes hold.")
@node_options
@_errors
def get(
    out: str,
    study: str | None,
    series: str | None,
    sop: str | None,
    everything: bool,
    **node_opts: Any,
) -> None:
    """Fetch instances into OUT/<study>/<series>/<sop>.dcm, byte-identical and digest-checked."""
    if not (study or series or sop or everything):
        raise TransferError("give --study, --series, --sop or --all")
    _, addrs, creds = _resolve(**node_opts)
    paths = asyncio.run(lib.fetch(addrs, creds, out, study=study, series=series, sop=sop))
    click.echo(f"fetched {len(paths)} files into {out}")


@cli.group(context_settings=CONTEXT)
def pki_group() -> None:
    """A CA and node certificates for TLS between workstation and nodes."""


@pki_group.command(name="init", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing CA.")
@click.option(
    "--token/--no-token",
    default=True,
    show_default=True,
    help="Also write a random shared token (DIR/token).",
)
@_errors
def pki_init(directory: str, force: bool, token: bool) -> None:
    """Create a CA (DIR/ca.crt, DIR/ca.key) and a shared token (DIR/token)."""
    from transfer import pki  # lazy: cryptography costs ~25 ms of every start-up

    res = pki.init_ca(directory, force=force)
    click.echo(f"CA: {res.cert}")
    if token:
        tok = Path(directory) / "token"
        if not tok.exists() or force:
            pki.new_token(tok)
        click.echo(f"token: {tok}")


@pki_group.command(name="issue", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--name", required=True, help="Certificate name (files DIR/NAME.crt and DIR/NAME.key)."
)
@click.option("--ip", "ips", multiple=True, help="IP address SAN (repeatable).")
@click.option("--dns", "dns", multiple=True, help="DNS name SAN (repeatable).")
@click.option(
    "--client", is_flag=True, help="A client certificate (mutual TLS) instead of a node one."
)
@_errors
def pki_issue(
    directory: str, name: str, ips: tuple[str, ...], dns: tuple[str, ...], client: bool
) -> None:
    """Issue a certificate signed by the CA in DIRECTORY."""
    from transfer import pki

    res = pki.issue(directory, name, ips=list(ips), dns=list(dns), client=client)
    click.echo(f"{res.cert}\n{res.key}")


cli.add_command(pki_group, name="pki")


@cli.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--slices", type=int, default=360, show_default=True, help="Number of slices.")
@click.option("--rows", type=int, default=640, show_default=True, help="Rows per slice (16-4096).")
@click.option(
    "--cols", type=int, default=640, show_default=True, help="Columns per slice (16-4096)."
)
@click.option(
    "--kind",
    type=click.Choice(["raw", "compressed"]),
    default="raw",
    show_default=True,
    help="raw = Explicit VR Little Endian (~820 KB per 640x640 slice); compressed = RLE Lossless.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Same seed, same UIDs and pixels (deterministic).",
)
@_errors
def synth(out: str, slices: int, rows: int, cols: int, kind: str, seed: int) -> None:
    """Generate a synthetic CT series (the paper's 360 slices of 640x640, 16-bit)."""
    try:
        from transfer.synth import generate_series  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise TransferError("transfer.synth is not available in this installation") from None
    try:
        paths = generate_series(
            Path(out), slices=slices, rows=rows, cols=cols, kind=kind, seed=seed
        )
    except ValueError as exc:  # transfer.synth.SynthError: bad arguments
        raise TransferError(str(exc)) from None
    total = sum(p.stat().st_size for p in paths)
    click.echo(f"wrote {len(paths)} files ({total / 1e6:.1f} MB) into {out}")


def main() -> None:
    cli(prog_name="transfer")


if __name__ == "__main__":
    main()
