"""``syncdevice``: the device agent's command line, a thin layer over :mod:`device.agent`.

Every command opens the device store, does its work over iroh, and exits. Edits are saved
locally first; a command that edits then waits (``--wait`` seconds) until a quorum of syncnodes
stored the update, and if they are unreachable it says so and leaves the update in the outbox
for the next run. ``--json`` gives machine-readable output on stdout. Error handling, Ctrl-C,
``--json`` and progress display are shared by every command: :mod:`device.cli_support`.

This module holds the group (its options, exit codes, ``--json`` on every command) and the
commands about the device as a whole: ``init``, ``create``, ``list``, ``status``,
``set-address``, ``selfcheck``. The others are grouped by what they touch:
:mod:`device.cli_content` (``show``, ``set``, ``edit``, ``watch``), :mod:`device.cli_members`
(``members``, ``invite``, ``join``, ``remove``, ``role``, ``leave``, ``rotate``, ``compact``),
:mod:`device.cli_export` (``export``, ``import``), :mod:`device.cli_evidence` (``alarms``,
``verify-evidence``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
import trio

from device import cli_support
from device.cli_content import edit, set_, show, watch
from device.cli_evidence import alarms, verify_evidence
from device.cli_export import export, import_
from device.cli_group import admit_members, report_members
from device.cli_members import compact, invite, join, leave, members, remove, role, rotate
from device.cli_support import (
    EXIT_CODES,
    JSON_OPTION,
    PENDING,
    WAIT,
    Ctx,
    check_listen,
    check_relays,
    pass_ctx,
    progress,
    run_device,
)
from device.cli_syncnodes import syncnode
from proto import PROTOCOL_VERSION

DEFAULT_HOME = Path(os.environ.get("SYNCDEVICE_HOME", "~/.local/share/syncdevice"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="syncnode",
                      message=f"%(prog)s %(version)s (wire protocol v{PROTOCOL_VERSION})")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_HOME,
              show_default=True, envvar="SYNCDEVICE_HOME",
              help="Device directory: keys, MLS state and documents (env SYNCDEVICE_HOME).")
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable JSON on stdout (also accepted after the command).")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log verbosity (logs go to stderr).")
@click.option("--listen", default="127.0.0.1:0", show_default=True, envvar="SYNCDEVICE_LISTEN",
              callback=check_listen,
              help="Local address for direct (iroh) connections; use 0.0.0.0:0 to be reachable "
                   "from other machines. Port 0 reuses the previous run's port if free.")
@click.option("--relay", "relays", multiple=True, metavar="URL", callback=check_relays,
              help="iroh relay server(s) for peers that cannot connect directly.")
@click.pass_context
def cli(ctx: click.Context, home: Path, as_json: bool, log_level: str, listen: str,
        relays: tuple[str, ...]) -> None:
    """syncdevice: edit end-to-end encrypted documents offline and sync them via syncnodes.

    The device keeps the keys and the documents; syncnodes only ever see ciphertext.
    Start with `syncdevice init`, then `create --syncnode TICKET ...`; or, on a second
    device, `join --init INVITE`. Every other command needs an existing device in --home.
    DOC arguments take a document name or a prefix of its id.
    """
    from proto.logs import configure_logging

    configure_logging(log_level)
    ctx.obj = Ctx(home.expanduser(), as_json, listen, relays)


@cli.command()
@pass_ctx
def init(ctx: Ctx) -> None:
    """Create this device's identity (keys) in --home, or show the existing one."""

    async def go(device: Any) -> None:
        ctx.out(f"device {device.id}\nhome {ctx.home}",
                {"device": device.fingerprint.hex(), "endpoint": device.endpoint_id.hex(),
                 "home": str(ctx.home)})

    run_device(ctx, go, create=True)


@cli.command()
@click.option("--syncnode", "syncnodes", multiple=True, metavar="TICKET",
              help="A syncnode ticket (sn1...); repeat for each syncnode (3 recommended). "
                   "Required unless --members-of is given.")
@click.option("--name", default="", help="A local name for the document.")
@click.option("--members-of", "members_of", metavar="DOC", default=None,
              help="Give the new document the members and roles of DOC (this device must be "
                   "an admin of DOC), and DOC's syncnodes unless --syncnode is given. Each "
                   "member's device joins by itself through DOC, while it runs `syncdevice "
                   "watch` (or an app) and this device is online; `create` stays up to --wait "
                   "seconds to admit them.")
@WAIT
@pass_ctx
def create(ctx: Ctx, syncnodes: tuple[str, ...], name: str, members_of: str | None,
           wait: float) -> None:
    """Create a new document served by the given syncnodes.

    The document is usable at once; a quorum of its syncnodes must register it before edits
    become durable and before anyone can join. If they cannot be reached within --wait
    seconds, it says so and exits 3: the document stays local and registers the next time
    any syncdevice command runs with them reachable. With --members-of it also exits 3 when
    the offer to DOC's members is not yet stored by a quorum of DOC's syncnodes."""
    if not syncnodes and members_of is None:
        raise click.UsageError("give the document's syncnodes (--syncnode TICKET, repeated) or "
                               "--members-of DOC")

    async def go(device: Any) -> int | None:
        offered: dict[str, Any] = {}
        with progress(ctx, "creating the document...") as status:
            source = device.document(members_of) if members_of is not None else None
            doc = await device.create_document(list(syncnodes), name=name, from_group=source)
            syncnodes_ = doc.manifest.syncnodes
            quorum = doc.manifest.acceptors().quorum
            status.update(f"registering it with its syncnodes (a quorum is {quorum} of "
                          f"{len(syncnodes_)})...")
            with trio.move_on_after(wait):
                await doc.wait_connected(quorum)
            if source is not None:
                status.update(f"waiting for the members of {source.name} to join...")
                offered = await admit_members(doc, source, wait, status.update)
        registered = len(doc.sync_status().connected)
        ctx.out(f"created {doc.name} {doc.id}",
                {"name": doc.name, "id": doc.id, "registered": registered,
                 "syncnodes": len(syncnodes_), "quorum": quorum} | offered)
        if offered:
            report_members(offered, wait)
        if registered < quorum:
            click.echo(f"only {registered} of {len(syncnodes_)} syncnodes registered it within "
                       f"{wait:g} s (a quorum is {quorum}): the document is local for now; it "
                       "registers when they are reachable (e.g. `syncdevice status`)", err=True)
            return PENDING
        return PENDING if offered.get("offer_pending") else None

    run_device(ctx, go)


@cli.command(name="list")
@pass_ctx
def list_(ctx: Ctx) -> None:
    """List this device's documents."""

    async def go(device: Any) -> None:
        rows = [{"name": d.name, "id": d.id, "epoch": d.epoch, "members": len(d.members()),
                 "status": d.status} for d in device.documents()]
        human = "\n".join(f"{r['name']:<16} {r['id'][:16]}  epoch {r['epoch']:<4} "
                          f"{r['members']} member(s)  {r['status']}" for r in rows)
        ctx.out(human or "no documents", rows)

    run_device(ctx, go)


@cli.command()
@click.argument("doc", required=False)
@WAIT
@pass_ctx
def status(ctx: Ctx, doc: str | None, wait: float) -> None:
    """Sync status: updates durable on a quorum vs pending, reachable syncnodes, alarms.
    Also delivers pending updates (waits up to --wait seconds for that); exits with code 3
    if some are still pending then."""

    async def go(device: Any) -> int | None:
        docs = [device.document(doc)] if doc else device.documents()
        deadline = trio.current_time() + wait
        for d in docs:
            await cli_support.send_pending(d, deadline)
        with trio.move_on_after(min(wait, 5.0)):  # give the links a moment to report
            for d in docs:
                if d.status == "active":
                    await d.wait_connected(len(d.manifest.syncnodes))
        rows = []
        for d in docs:
            s = d.sync_status()
            rows.append({"name": d.name, "id": d.id, "epoch": s.epoch, "durable": s.durable,
                         "pending": s.unsent + s.outbox, "connected": len(s.connected),
                         "syncnodes": s.syncnodes, "status": s.status,
                         "waiting_for": s.waiting_for, "gap": s.gap,
                         "alarms": [a.kind for a in d.alarms()]})
        human = "\n".join(
            f"{r['name']:<16} epoch {r['epoch']:<4} durable {r['durable']:<6} "
            f"pending {r['pending']:<6} syncnodes {r['connected']}/{r['syncnodes']}  "
            f"{r['status']}{'  ALARMS: ' + ','.join(r['alarms']) if r['alarms'] else ''}"
            f"{_gap(r)}"
            for r in rows)
        ctx.out(human or "no documents", rows)
        return PENDING if any(r["pending"] for r in rows) else None

    run_device(ctx, go)


@cli.command(name="set-address")
@click.argument("ticket")
@pass_ctx
def set_address(ctx: Ctx, ticket: str) -> None:
    """Reach a syncnode that moved at the address in its new TICKET (`syncnode info` prints
    it), in every document that names it. The node id in the ticket must be the same: it is
    what authenticates the syncnode, so a wrong address can only fail to connect."""

    async def go(device: Any) -> None:
        docs = device.set_syncnode_address(ticket)
        with progress(ctx, "connecting...") as status:
            with trio.move_on_after(10):
                for d in docs:
                    status.update(f"connecting {d.name}...")
                    await d.wait_connected(len(d.manifest.syncnodes))
        rows = [{"name": d.name, "connected": len(d.sync_status().connected),
                 "syncnodes": len(d.manifest.syncnodes)} for d in docs]
        ctx.out("\n".join(f"{r['name']:<16} syncnodes {r['connected']}/{r['syncnodes']}"
                          for r in rows), rows)

    run_device(ctx, go)


@cli.command()
@pass_ctx
def selfcheck(ctx: Ctx) -> None:
    """Check that this machine can run a device: MLS, CRDT, codec, SQLite and iroh."""
    from device.selfcheck import run

    say = (lambda line: click.echo(line, err=True)) if ctx.json else click.echo
    say("syncdevice selfcheck")
    ok = run(say)
    ctx.out("all checks passed" if ok else "some checks failed", {"ok": ok})
    if not ok:
        sys.exit(1)


for _command in (show, set_, edit, watch, members, invite, join, remove, role, leave, rotate,
                 compact, export, import_, alarms, verify_evidence):
    cli.add_command(_command)
cli.add_command(syncnode)
for _command in [*cli.commands.values(), *syncnode.commands.values()]:
    if not isinstance(_command, click.Group):
        JSON_OPTION(_command)
    _command.epilog = EXIT_CODES



def _gap(row: dict[str, Any]) -> str:
    """The status line's note of a gap the syncnodes could not fill (sync_status().gap)."""
    if not row["gap"]:
        return ""
    return f"  GAP: {row['waiting_for']} update(s) on no syncnode; asked the members"


def main() -> None:
    cli_support.main(cli)
