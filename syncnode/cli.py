"""``syncnode``: the daemon and operator tools."""

from __future__ import annotations

import json
import sqlite3
import sys
from functools import partial
from pathlib import Path
from typing import Any

import click

from proto import PROTOCOL_VERSION
from proto.errors import ConfigError, KeyFileError

DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=Path("syncnode-data"), show_default=True,
                        help="Directory holding the node key, database and syncnode.toml.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="syncnode",
                      message=f"%(prog)s %(version)s (wire protocol v{PROTOCOL_VERSION})")
def cli() -> None:
    """syncnode: an untrusted relay and Paxos acceptor for end-to-end encrypted documents.

    A syncnode stores and relays MLS-encrypted messages for the documents that name it and
    orders their commits together with the other syncnodes of each document. It never sees
    plaintext.
    """


@cli.command()
def selfcheck() -> None:
    """Check the installed stack: native bindings (MLS, CRDT) and an iroh loopback exchange."""
    from syncnode.selfcheck import run

    click.echo("syncnode selfcheck")
    if not run(click.echo):
        click.echo("selfcheck FAILED", err=True)
        sys.exit(1)
    click.echo("all checks passed")


@cli.command()
@DATA_DIR
def init(data_dir: Path) -> None:
    """Create the data dir, the node key (mode 0600) and a commented syncnode.toml.

    Refuses to touch an existing key: the key is the node's identity, and every document that
    names this node depends on it.
    """
    from proto.identity import SecretKey, node_id_hex, write_key_file
    from syncnode.config import CONFIG_NAME, DEFAULT_TOML, KEY_NAME

    key_path = data_dir / KEY_NAME
    if key_path.exists():
        raise click.ClickException(f"{key_path} already exists; not overwriting the node key")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = SecretKey.generate()
    try:
        write_key_file(key_path, key)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    config_path = data_dir / CONFIG_NAME
    if not config_path.exists():
        config_path.write_text(DEFAULT_TOML, encoding="utf-8")
    click.echo(f"created {data_dir}")
    click.echo(f"node id: {node_id_hex(key.public)}")
    click.echo(f"config:  {config_path} (edit it, then: syncnode run --data-dir {data_dir})")


@cli.command()
@DATA_DIR
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Config file (default: syncnode.toml in the data dir, if present).")
@click.option("--listen", help="UDP address for the iroh endpoint, e.g. 0.0.0.0:7600 "
              "(port 0 picks a free one).")
@click.option("--relay", help='Relay server URL, or "off" for direct connections only.')
@click.option("--http", "http_listen", help="host:port of /healthz, /readyz and /metrics.")
@click.option("--no-group-commit", is_flag=True,
              help="One fsync per write (for benchmarks only: much slower).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def run(data_dir: Path, config_file: Path | None, listen: str | None, relay: str | None,
        http_listen: str | None, no_group_commit: bool, log_level: str | None) -> None:
    """Run the daemon until SIGINT or SIGTERM.

    Prints the node id and a ticket (paste it into `syncdevice create --syncnode TICKET`).
    Logs are JSON lines on stderr.
    """
    from dataclasses import replace

    import trio

    from proto.logs import configure_logging
    from syncnode.config import load_config
    from syncnode.daemon import run_daemon

    try:
        config = load_config(data_dir, config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    flags = {"listen": listen, "relay": relay, "http_listen": http_listen,
             "log_level": log_level}
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    if no_group_commit:
        overrides["group_commit"] = False
    config = replace(config, **overrides)
    configure_logging(config.log_level)
    try:
        trio.run(partial(run_daemon, config, echo=click.echo))
    except (KeyFileError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(data_dir: Path, as_json: bool) -> None:
    """Show node id, address ticket, groups hosted and storage use (works while running)."""
    from proto.identity import node_id_hex, read_key_file
    from syncnode.config import DB_NAME, KEY_NAME, STATE_NAME
    from syncnode.storage import storage_bytes

    try:
        key = read_key_file(data_dir / KEY_NAME)
    except KeyFileError as exc:
        raise click.ClickException(f"{exc} (run: syncnode init --data-dir {data_dir})") from None
    out: dict[str, object] = {"node_id": node_id_hex(key.public), "data_dir": str(data_dir)}
    state_path = data_dir / STATE_NAME
    if state_path.exists():
        state = json.loads(state_path.read_text())
        out.update(ticket=state.get("ticket"), http=state.get("http"),
                   last_pid=state.get("pid"))
    db = data_dir / DB_NAME
    groups = messages = decisions = 0
    if db.exists():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            groups = conn.execute("SELECT count(*) FROM groups").fetchone()[0]
            messages = conn.execute("SELECT count(*) FROM envelopes").fetchone()[0]
            decisions = conn.execute("SELECT count(*) FROM decided WHERE slot>0").fetchone()[0]
        finally:
            conn.close()
    out.update(groups=groups, envelopes=messages, decisions=decisions,
               storage_bytes=storage_bytes(db))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"node id:   {out['node_id']}")
    click.echo(f"ticket:    {out.get('ticket') or '(not run yet: start it to learn its address)'}")
    click.echo(f"groups:    {groups}  (decisions {decisions}, envelopes {messages})")
    click.echo(f"storage:   {storage_bytes(db) / 1e6:.1f} MB in {db}")


def main() -> None:
    cli()
