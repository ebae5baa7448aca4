"""``syncdevice``: the device agent's command line, a thin layer over :mod:`device.agent`.

Every command opens the device store, does its work over iroh, and exits. Edits are saved
locally first; a command that edits then waits (``--wait`` seconds) until a quorum of syncnodes
stored the update, and if they are unreachable it says so and leaves the update in the outbox
for the next run. ``--json`` gives machine-readable output on stdout. Error handling, Ctrl-C,
``--json`` and progress display are shared by every command: :mod:`device.cli_support`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import trio

from device import cli_support
from device.cli_export import export, import_
from device.cli_support import (
    EXIT_CODES,
    JSON_OPTION,
    PENDING,
    WAIT,
    CliError,
    Ctx,
    check_listen,
    check_relays,
    pass_ctx,
    progress,
    require_device,
    run_device,
    settle,
)
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
@click.option("--syncnode", "syncnodes", multiple=True, required=True, metavar="TICKET",
              help="A syncnode ticket (sn1...); repeat for each syncnode (3 recommended).")
@click.option("--name", default="", help="A local name for the document.")
@WAIT
@pass_ctx
def create(ctx: Ctx, syncnodes: tuple[str, ...], name: str, wait: float) -> None:
    """Create a new document served by the given syncnodes.

    The document is usable at once; a quorum of its syncnodes must register it before edits
    become durable and before anyone can join. If they cannot be reached within --wait
    seconds, it says so and exits 3: the document stays local and registers the next time
    any syncdevice command runs with them reachable."""
    async def go(device: Any) -> int | None:
        with progress(ctx, "creating the document...") as status:
            doc = await device.create_document(list(syncnodes), name=name)
            quorum = doc.manifest.acceptors().quorum
            status.update(f"registering it with its syncnodes (a quorum is {quorum} of "
                          f"{len(syncnodes)})...")
            with trio.move_on_after(wait):
                await doc.wait_connected(quorum)
        registered = len(doc.sync_status().connected)
        ctx.out(f"created {doc.name} {doc.id}",
                {"name": doc.name, "id": doc.id, "registered": registered,
                 "syncnodes": len(syncnodes), "quorum": quorum})
        if registered < quorum:
            click.echo(f"only {registered} of {len(syncnodes)} syncnodes registered it within "
                       f"{wait:g} s (a quorum is {quorum}): the document is local for now; it "
                       "registers when they are reachable (e.g. `syncdevice status`)", err=True)
            return PENDING
        return None

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
@click.argument("doc")
@click.option("--sync", "sync_for", default=2.0, show_default=True,
              help="Seconds to fetch news from syncnodes first (0: show the local copy).")
@pass_ctx
def show(ctx: Ctx, doc: str, sync_for: float) -> None:
    """Print a document's content."""

    async def go(device: Any) -> None:
        d = device.document(doc)
        if sync_for > 0:
            with progress(ctx, "fetching news from the syncnodes..."):
                await trio.sleep(sync_for)
        value = d.value()
        ctx.out(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False), value)

    run_device(ctx, go)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@cli.command(name="set")
@click.argument("doc")
@click.argument("path")
@click.argument("value")
@WAIT
@pass_ctx
def set_(ctx: Ctx, doc: str, path: str, value: str, wait: float) -> None:
    """Set MAP.KEY to VALUE (JSON if it parses, else a string), e.g. `set notes meta.title Hi`."""
    container, sep, key = path.partition(".")
    if not sep or not key:
        raise click.BadParameter("PATH is MAP.KEY, e.g. meta.title", param_hint="PATH")
    parsed = _parse_value(value)

    async def go(device: Any) -> None:
        d = device.document(doc)
        d.change(lambda e: e.map(container).insert(key, parsed))
        await settle(d, wait)
        ctx.out(f"{path} = {json.dumps(parsed, ensure_ascii=False)}",
                {"path": path, "value": parsed})

    run_device(ctx, go)


@cli.command()
@click.argument("doc")
@click.option("--text", "text_name", metavar="NAME", help="Edit text container NAME.")
@click.option("--insert", nargs=2, type=(int, str), metavar="POS STR",
              help="With --text: insert STR at code point POS.")
@click.option("--append", metavar="STR", help="With --text: append STR.")
@click.option("--delete", nargs=2, type=(int, int), metavar="POS LEN",
              help="With --text: delete LEN code points at POS.")
@click.option("--list", "list_name", metavar="NAME", help="Append to list container NAME.")
@click.option("--push", metavar="VALUE", help="With --list: the value to append (JSON or str).")
@click.option("--counter", metavar="NAME", help="Add to counter NAME.")
@click.option("--add", type=float, default=1, show_default=True, help="With --counter: amount.")
@WAIT
@pass_ctx
def edit(ctx: Ctx, doc: str, text_name: str | None, insert: tuple[int, str] | None,
         append: str | None, delete: tuple[int, int] | None, list_name: str | None,
         push: str | None, counter: str | None, add: float, wait: float) -> None:
    """Edit text, lists and counters: `edit notes --text body --append "hi"`,
    `edit notes --list todo --push milk`, `edit notes --counter likes --add 1`."""
    if not (text_name or list_name or counter):
        raise click.UsageError("say what to edit: --text NAME, --list NAME or --counter NAME")
    if not text_name and (insert or delete or append is not None):
        raise click.UsageError("--insert, --append and --delete need --text NAME")
    if text_name and not (insert or delete or append is not None):
        raise click.UsageError("--text NAME needs --append STR, --insert POS STR or "
                               "--delete POS LEN")
    if bool(list_name) != (push is not None):
        raise click.UsageError("--list NAME and --push VALUE go together")

    def fn(e: Any) -> None:
        if text_name:
            t = e.text(text_name)
            size = len(t.to_string())  # checked first: a refused edit changes nothing
            if delete and not (0 <= delete[0] and 0 <= delete[1]
                               and delete[0] + delete[1] <= size):
                raise click.BadParameter(f"text {text_name!r} has {size} code points; cannot "
                                         f"delete {delete[1]} at {delete[0]}",
                                         param_hint="--delete")
            size -= delete[1] if delete else 0
            if insert and not 0 <= insert[0] <= size:
                raise click.BadParameter(f"position {insert[0]} is outside text {text_name!r} "
                                         f"(0..{size})", param_hint="--insert")
            if delete:
                t.delete(*delete)
            if insert:
                t.insert(*insert)
            if append is not None:
                t.insert(len(t.to_string()), append)
        if list_name and push is not None:
            e.list(list_name).push(_parse_value(push))
        if counter:
            e.counter(counter).increment(add)

    async def go(device: Any) -> None:
        d = device.document(doc)
        d.change(fn)
        await settle(d, wait)
        ctx.out("ok", {"ok": True})

    run_device(ctx, go)


@cli.command()
@click.argument("doc")
@click.option("--for", "duration", type=float, default=None,
              help="Stop after this many seconds (default: until Ctrl-C).")
@pass_ctx
def watch(ctx: Ctx, doc: str, duration: float | None) -> None:
    """Print the document, then every change as it arrives (also sends pending edits)."""

    async def go(device: Any) -> None:
        from device.document import Alarm

        d = device.document(doc)
        ctx.out(json.dumps(d.value(), sort_keys=True, ensure_ascii=False),
                {"event": "value", "value": d.value()})
        with trio.move_on_after(duration if duration is not None else float("inf")):
            async with d.events() as events:
                async for ev in events:
                    if isinstance(ev, Alarm):
                        ctx.out(f"ALARM {ev.kind}: {ev.detail}",
                                {"event": "alarm", "kind": ev.kind, "detail": ev.detail})
                        continue
                    value = d.value()
                    ctx.out(f"[{ev.origin} {','.join(ev.senders)}] "
                            f"{json.dumps(value, sort_keys=True, ensure_ascii=False)}",
                            {"event": "change", "origin": ev.origin,
                             "senders": list(ev.senders), "value": value})

    run_device(ctx, go)


@cli.command()
@click.argument("doc")
@pass_ctx
def members(ctx: Ctx, doc: str) -> None:
    """List the document's member devices."""

    async def go(device: Any) -> None:
        d = device.document(doc)
        rows = [{"id": m.id, "fingerprint": m.fingerprint.hex(), "role": m.role,
                 "self": m.is_self} for m in d.members()]
        human = "\n".join(f"{r['id']}  {r['role']:<6} {'(this device)' if r['self'] else ''}"
                          for r in rows)
        ctx.out(human, rows)

    run_device(ctx, go)


@cli.command()
@click.argument("doc")
@click.option("--ttl", default=24 * 3600.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Ticket lifetime, seconds (more than 0).")
@click.option("--wait", default=600.0, show_default=True,
              help="Stay online this long to add the new device (0: print and exit; the add "
                   "happens the next time this device runs).")
@click.option("--qr", is_flag=True, help="Also draw the ticket as a QR code (on stderr).")
@pass_ctx
def invite(ctx: Ctx, doc: str, ttl: float, wait: float, qr: bool) -> None:
    """Print a one-time invite ticket for a new device, then stay online until that device
    was added and holds the document.

    The ticket is single use and expires after --ttl seconds; it holds a one-time secret, so
    hand it over privately. The new device runs `syncdevice join --init TICKET`. Before the
    add, the document is stored encrypted for the new device on a quorum of syncnodes, so it
    gets it even if this device goes away right after. With --wait 0 (or when --wait runs
    out) the add happens whenever this device next runs any syncdevice command."""

    async def go(device: Any) -> int | None:
        d = device.document(doc)
        ticket = d.invite(ttl=ttl)
        ctx.out(ticket, {"ticket": ticket})
        sys.stdout.flush()
        if qr:
            import io

            import qrcode

            code = qrcode.QRCode(border=1)
            code.add_data(ticket.upper())  # upper case fits QR's compact alphanumeric mode
            buf = io.StringIO()
            code.print_ascii(out=buf, invert=True)
            click.echo(buf.getvalue(), err=True)
        if wait <= 0:
            return None
        with progress(ctx, "waiting for the new device (Ctrl-C to stop)...") as status:
            def say(msg: str) -> None:
                status.say(msg)
                status.update(msg.rsplit("; ", 1)[-1] + "...")

            result = None
            with trio.move_on_after(wait):
                result = await d.wait_invite(ticket, say=say)
        if result is not None:  # printed after the spinner is gone
            added, via = result
            how = ("sent it the document directly" if via == "direct" else
                   f"the document waits for it on {added.staged_on} syncnode(s)")
            if ctx.json:
                ctx.out("", {"added": added.device, "epoch": added.slot, "via": via})
            else:
                click.echo(f"added {added.device} at epoch {added.slot}; {how}", err=True)
            return None
        raise CliError(f"no device used the ticket within {wait:g} s; it stays valid for "
                       f"--ttl, and the device is added whenever this one runs "
                       f"(e.g. `syncdevice watch {doc}`)")

    run_device(ctx, go)


@cli.command()
@click.argument("ticket")
@click.option("--name", default="", help="A local name for the document.")
@click.option("--timeout", default=600.0, show_default=True, help="Give up after seconds.")
@click.option("--init", "create", is_flag=True,
              help="Create the device in --home first if it has none (a new device's first "
                   "step; without it, join refuses a --home with no device).")
@pass_ctx
def join(ctx: Ctx, ticket: str, name: str, timeout: float, create: bool) -> None:
    """Join a document with an invite ticket (the inviter adds this device).

    On a new device: `syncdevice join --init TICKET` creates the device and joins. It prints
    each step on stderr and succeeds only once this device holds the document; a spent,
    expired or unknown ticket is refused by the inviter within seconds; at --timeout it
    fails saying what it was waiting for."""
    if not create:
        require_device(ctx, hint=" (or `syncdevice join --init TICKET`)")
    from proto.errors import DecodeError
    from proto.invite import InviteTicket

    try:  # before --init creates anything
        InviteTicket.parse(ticket)
    except DecodeError as exc:
        raise CliError(f"bad invite ticket: {exc}") from None

    async def go(device: Any) -> None:
        with progress(ctx, "joining...") as status:
            def say(msg: str) -> None:
                status.say(msg)
                status.update("waiting..." if "waiting" in msg else "...")

            def bytes_progress(p: Any) -> None:
                status.update(f"document: {p.done / 1024:,.0f} / {p.total / 1024:,.0f} KiB "
                              f"({100 * p.done // max(p.total, 1)}%)")

            d = await device.join(ticket, name=name, timeout=timeout, progress=say,
                                  on_progress=bytes_progress)
        ctx.out(f"joined {d.name} {d.id}", {"name": d.name, "id": d.id, "epoch": d.epoch})

    run_device(ctx, go, create=create)


@cli.command()
@click.argument("doc")
@click.argument("device_id")
@pass_ctx
def remove(ctx: Ctx, doc: str, device_id: str) -> None:
    """Remove DEVICE_ID (an id prefix from `members`) from the document."""

    async def go(device: Any) -> None:
        slot = await device.document(doc).remove_device(device_id)
        ctx.out(f"removed {device_id} at epoch {slot}", {"epoch": slot})

    run_device(ctx, go)


@cli.command()
@click.argument("doc")
@pass_ctx
def rotate(ctx: Ctx, doc: str) -> None:
    """Rotate the document's keys (an MLS key update through Paxos)."""

    async def go(device: Any) -> None:
        slot = await device.document(doc).rotate_keys()
        ctx.out(f"keys rotated; epoch {slot}", {"epoch": slot})

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
        with trio.move_on_after(wait):
            for d in docs:
                d.flush()
                await d.wait_durable()
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
                         "alarms": [a.kind for a in d.alarms()]})
        human = "\n".join(
            f"{r['name']:<16} epoch {r['epoch']:<4} durable {r['durable']:<6} "
            f"pending {r['pending']:<6} syncnodes {r['connected']}/{r['syncnodes']}  "
            f"{r['status']}{'  ALARMS: ' + ','.join(r['alarms']) if r['alarms'] else ''}"
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


cli.add_command(export)
cli.add_command(import_)
for _command in cli.commands.values():
    JSON_OPTION(_command)
    _command.epilog = EXIT_CODES


def main() -> None:
    cli_support.main(cli)
