"""``syncnode``: the daemon and operator tools."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import click

from proto import PROTOCOL_VERSION
from proto.errors import ConfigError, KeyFileError

INTERRUPTED = 130


ERROR = "1    error: one line on stderr says what is wrong and what to do"
USAGE = "2    usage error: unknown command or option, invalid option value"
RUN_OK = "0    stopped by SIGINT or SIGTERM after a graceful shutdown"
RUN_INTERRUPTED = f"{INTERRUPTED}  interrupted (Ctrl-C) while still starting, before serving"


def exit_codes(*lines: str) -> str:
    """The "Exit codes" epilog of a command (``\\b`` keeps click from re-wrapping it)."""
    ordered = sorted((*lines, USAGE), key=lambda ln: int(ln.split()[0]))
    return "\b\nExit codes:\n" + "\n".join(f"  {ln}" for ln in ordered)


DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=Path("syncnode-data"), show_default=True,
                        help="Directory holding the node key, database and syncnode.toml.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             epilog=exit_codes("0    success (run: stopped by SIGINT/SIGTERM, gracefully)",
                               ERROR, f"{INTERRUPTED}  run: interrupted while still starting"))
@click.version_option(package_name="syncnode",
                      message=f"%(prog)s %(version)s (wire protocol v{PROTOCOL_VERSION})")
def cli() -> None:
    """syncnode: an untrusted relay and Paxos acceptor for end-to-end encrypted documents.

    A syncnode stores and relays MLS-encrypted messages for the documents that name it and
    orders their commits together with the other syncnodes of each document. It never sees
    plaintext.
    """


@cli.command(epilog=exit_codes("0    every check passed", "1    a check failed (listed above)"))
def selfcheck() -> None:
    """Check what a syncnode uses: codec and signatures, SQLite, an iroh loopback exchange."""
    from syncnode.selfcheck import run

    click.echo("syncnode selfcheck")
    if not run(click.echo):
        click.echo("selfcheck FAILED", err=True)
        sys.exit(1)
    click.echo("all checks passed")


@cli.command(epilog=exit_codes("0    created", ERROR))
@DATA_DIR
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Use this existing node.key instead of a new one: another process of the "
              "same node (all of them share one PostgreSQL database).")
def init(data_dir: Path, key_file: Path | None) -> None:
    """Create the data dir, the node key (mode 0600) and a commented syncnode.toml.

    Refuses to touch an existing key: the key is the node's identity, and every document that
    names this node depends on it.
    """
    from proto.identity import node_id_hex, read_key_file
    from syncnode.config import CONFIG_NAME, KEY_NAME
    from syncnode.startup import init_data_dir

    key_path = data_dir / KEY_NAME
    if key_path.exists():
        raise click.ClickException(f"{key_path} already exists; not overwriting the node key")
    try:
        key = init_data_dir(data_dir, read_key_file(key_file) if key_file else None)
    except (KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"created {data_dir}")
    click.echo(f"node id: {node_id_hex(key.public)}")
    click.echo(f"config:  {data_dir / CONFIG_NAME} (edit it, then: syncnode run --data-dir "
               f"{data_dir})")


@cli.command(epilog=exit_codes(RUN_OK, ERROR, RUN_INTERRUPTED))
@DATA_DIR
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Config file (default: syncnode.toml in the data dir, if present).")
@click.option("--listen", help="UDP IP:PORT for the iroh endpoint, e.g. 0.0.0.0:7600; port 0 "
              "picks a free one the first time and reuses it on later starts.")
@click.option("--relay", help='Relay server URL, or "off" for direct connections only.')
@click.option("--database", "storage", metavar="URL|PATH",
              help="Where the data is (the storage key of syncnode.toml): a postgresql:// URL "
              "(several processes with the same node.key may share it) or a SQLite file "
              "(default: syncnode.db in the data dir).")
@click.option("--http", "http_listen", help="HOST:PORT of /healthz, /readyz and /metrics.")
@click.option("--init", "init_dir", is_flag=True,
              help="Create the node key and syncnode.toml if the data dir has none (for "
              "scripts; by default run refuses an uninitialised data dir).")
@click.option("--no-group-commit", is_flag=True,
              help="One fsync per write (for benchmarks only: much slower).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def run(data_dir: Path, config_file: Path | None, listen: str | None, relay: str | None,
        storage: str | None, http_listen: str | None, init_dir: bool, no_group_commit: bool,
        log_level: str | None) -> None:
    """Run the daemon until SIGINT or SIGTERM (both stop it gracefully, exit code 0).

    Prints the node id and a ticket (paste it into `syncdevice create --syncnode TICKET`); the
    ticket stays the same across restarts. Logs are JSON lines on stderr. Only one daemon can
    use a data dir at a time.
    """
    try:
        _run(data_dir, config_file, init_dir, no_group_commit,
             {"listen": listen, "relay": relay, "http_listen": http_listen,
              "log_level": log_level, "storage": storage})
    except KeyboardInterrupt:  # outside the daemon's own SIGINT handling
        from syncnode import daemon

        if daemon.STOPPED:  # a second SIGINT, re-raised after the graceful stop completed
            daemon.ignore_stop_signals()  # trio.run put the default handler back
            return
        click.echo("interrupted while starting; the node was not serving", err=True)
        sys.exit(INTERRUPTED)


def _run(data_dir: Path, config_file: Path | None, init_dir: bool, no_group_commit: bool,
         flags: dict[str, str | None]) -> None:
    from dataclasses import replace

    import trio

    from proto.logs import configure_logging
    from syncnode.config import load_config
    from syncnode.daemon import run_daemon
    from syncnode.startup import StartupError

    try:
        config = load_config(data_dir, config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    if no_group_commit:
        overrides["group_commit"] = False
    config = replace(config, **overrides)
    configure_logging(config.log_level)
    try:
        trio.run(partial(run_daemon, config, init=init_dir, echo=click.echo))
        from syncnode import daemon

        if daemon.STOPPED:
            daemon.ignore_stop_signals()  # trio.run put the default handler back
    except (KeyFileError, ConfigError, StartupError) as exc:
        raise click.ClickException(str(exc)) from None


@cli.command("migrate-storage", epilog=exit_codes(
    "0    every row copied and counted again on PostgreSQL", ERROR))
@DATA_DIR
@click.option("--from", "source", metavar="[sqlite:]PATH",
              help="The SQLite database to move (default: syncnode.db in the data dir).")
@click.option("--to", "target", metavar="URL", required=True,
              help="The PostgreSQL database, a postgresql:// URL; it must hold no node's data.")
def migrate_storage(data_dir: Path, source: str | None, target: str) -> None:
    """Move a stopped node's data from SQLite to PostgreSQL, all at once.

    Groups, logs, acceptor state, envelopes, mailbox and the node's storage incarnation and
    statement clock all move, so devices see the same node. The data dir's node.key binds the
    database to the node. Then set storage = "URL" in syncnode.toml (or run --database URL).
    The SQLite file is left as it was.
    """
    from proto.identity import read_key_file
    from syncnode.config import DB_NAME, KEY_NAME
    from syncnode.startup import StartupError, lock_data_dir
    from syncnode.storage.migrate import MigrationError
    from syncnode.storage.migrate import migrate_storage as migrate

    if not target.startswith(("postgresql://", "postgres://")):
        raise click.BadParameter("must be a postgresql:// URL", param_hint="--to")
    path = Path(source.removeprefix("sqlite:")) if source else data_dir / DB_NAME
    try:
        key = read_key_file(data_dir / KEY_NAME)
        fd = lock_data_dir(data_dir)  # a running node holds it: refuse
    except (KeyFileError, StartupError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        click.echo(f"copying {path} to PostgreSQL")
        copied = migrate(path, target, key.public, click.echo)
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        import os

        os.close(fd)
    click.echo(f"migrated {copied['groups']} groups, {copied['envelopes']} envelopes, "
               f"{copied['decided']} log entries; now set storage = \"{target}\" in "
               f"{data_dir / 'syncnode.toml'} (or run --database URL)")


@cli.command("dev-cluster", epilog=exit_codes(
    "0    stopped by Ctrl-C (SIGINT) or SIGTERM; every node stopped cleanly",
    "1    a node failed to start, died, or had to be killed (which one is said)"))
@click.option("--nodes", "count", type=click.IntRange(1, 32), default=3, show_default=True,
              help="Number of syncnodes.")
@click.option("--dir", "root", type=click.Path(file_okay=False, path_type=Path),
              default=Path("syncnode-dev"), show_default=True,
              help="Parent of the nodes' data dirs (node1, node2, ...), created on first use.")
@click.option("--base-port", type=click.IntRange(1, 65535 - 64),
              help="Node i (0-based) listens on UDP BASE+2i (iroh) and TCP BASE+2i+1 (HTTP). "
              "Default: free ports, remembered in each data dir.")
def dev_cluster(count: int, root: Path, base_port: int | None) -> None:
    """Run a local development cluster of real syncnodes on loopback, in the foreground.

    Prints one ticket per line, then a ready-to-paste `syncdevice create` line. Ctrl-C or
    SIGTERM stops every node (SIGINT, then SIGKILL after 15 s). If a node dies, the others
    are stopped too. Restarting with the same --dir gives the same tickets.
    """
    from syncnode.devcluster import DevCluster

    cluster = DevCluster(root, count, base_port, click.echo,
                         lambda line: click.echo(line, err=True))
    try:
        code = cluster.run()
    except OSError as exc:
        raise click.ClickException(f"dev-cluster: {exc}") from None
    sys.exit(code)


@cli.command(epilog=exit_codes("0    printed", ERROR))
@DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(data_dir: Path, as_json: bool) -> None:
    """Show node id, address ticket, groups hosted and storage use (works while running).

    Groups this node was added to after their genesis are "catching up" until its log reaches
    the slot that named it, then "pulling history" until it holds the envelopes stored before;
    groups it was removed from are counted until their data is deleted."""
    from proto.identity import node_id_hex, read_key_file
    from syncnode.config import KEY_NAME, STATE_NAME
    from syncnode.storage.sqlite_schema import groups_in_progress, storage_bytes, summary

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
    from syncnode.config import load_config

    try:
        database = load_config(data_dir).database
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if isinstance(database, str):  # PostgreSQL: counts only
        _info_postgres(out, database, as_json)
        return
    db = database
    held = summary(db) if db.exists() else {"groups": 0, "envelopes": 0, "decisions": 0,
                                            "catching_up": 0, "pulling": 0, "removed": 0}
    groups, messages, decisions = held["groups"], held["envelopes"], held["decisions"]
    behind = held["catching_up"] + held["pulling"]
    in_progress = groups_in_progress(db) if behind else []
    out.update(groups=groups, envelopes=messages, decisions=decisions,
               storage_bytes=storage_bytes(db), caught_up=groups - behind - held["removed"],
               catching_up=held["catching_up"], pulling_history=held["pulling"],
               removed=held["removed"], not_caught_up=in_progress)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"node id:   {out['node_id']}")
    click.echo(f"ticket:    {out.get('ticket') or '(not run yet: start it to learn its address)'}")
    click.echo(f"groups:    {groups}  (decisions {decisions}, envelopes {messages})")
    click.echo(f"hosting:   {out['caught_up']} caught up, {held['catching_up']} catching up "
               f"the log, {held['pulling']} pulling history, {held['removed']} removed "
               "(kept until their retention ends)")
    for gid in in_progress:
        click.echo(f"  not caught up: {gid}")
    if behind > len(in_progress):
        click.echo(f"  ... and {behind - len(in_progress)} more")
    click.echo(f"storage:   {storage_bytes(db) / 1e6:.1f} MB in {db}")


def _info_postgres(out: dict[str, object], url: str, as_json: bool) -> None:
    from syncnode.storage.postgres_schema import describe
    from syncnode.storage.postgres_schema import summary as pg_summary

    try:
        held = pg_summary(url)
    except Exception as exc:  # psycopg.Error, a missing table: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise click.ClickException(f"cannot read PostgreSQL ({describe(url)}): {first}"
                                   ) from None
    addrs = held.pop("addrs")
    if addrs:  # a ticket that lists every live process of the node
        from proto.ticket import NodeTicket

        out["ticket"] = str(NodeTicket(bytes.fromhex(str(out["node_id"])), tuple(addrs[:8])))
    out.update(held, storage=f"PostgreSQL {describe(url)}")
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"node id:   {out['node_id']}")
    click.echo(f"ticket:    {out.get('ticket') or '(not run yet: start it to learn its address)'}")
    click.echo(f"groups:    {held['groups']}  (decisions {held['decisions']}, envelopes "
               f"{held['envelopes']})")
    click.echo(f"storage:   {out['storage']}, {held['processes']} live processes of this "
               "node (the ticket lists them all)")


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:  # outside a command (click turns it into "Aborted!" inside)
        sys.exit(INTERRUPTED)
