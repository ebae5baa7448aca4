"""``syncdevice members``, ``invite``, ``join``, ``remove``, ``role``, ``leave`` and ``rotate``:
who is in a document, and what each member may do.

Roles (:class:`proto.manifest.Role`): an ``admin`` adds and removes devices, invites, and changes
roles; a ``writer`` edits; a ``reader`` only receives. Commands a role does not permit fail
before any network with one line and exit code 4.

Commands of :mod:`device.cli` (registered there), on the shared machinery of
:mod:`device.cli_support`. ``invite`` stays online until the new device holds the document;
``join`` (on the new device) returns only once it does (:mod:`device.joining`).
"""

from __future__ import annotations

import sys
from typing import Any

import click
import trio

from device.cli_support import CliError, Ctx, pass_ctx, progress, require_device, run_device

ROLES = ("admin", "writer", "reader")


@click.command()
@click.argument("doc")
@pass_ctx
def members(ctx: Ctx, doc: str) -> None:
    """List the document's member devices."""

    async def go(device: Any) -> None:
        d = device.document(doc)
        rows = [{"id": m.id, "fingerprint": m.fingerprint.hex(), "role": m.role,
                 "self": m.is_self} for m in d.members()]
        human = "\n".join(f"{r['id']}  {r['role']:<6} {'(this device)' if r['self'] else ''}"
                          .rstrip() for r in rows)
        ctx.out(human, rows)

    run_device(ctx, go)


@click.command()
@click.argument("doc")
@click.option("--ttl", default=24 * 3600.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Ticket lifetime, seconds (more than 0).")
@click.option("--wait", default=600.0, show_default=True,
              help="Stay online this long to add the new device (0: print and exit; the add "
                   "happens the next time this device runs).")
@click.option("--qr", is_flag=True, help="Also draw the ticket as a QR code (on stderr).")
@click.option("--role", "role", type=click.Choice(ROLES), default="writer", show_default=True,
              help="The new device's role: admin, writer (edits) or reader (receives only).")
@pass_ctx
def invite(ctx: Ctx, doc: str, ttl: float, wait: float, qr: bool, role: str) -> None:
    """Print a one-time invite ticket for a new device, then stay online until that device
    was added and holds the document. Only admins invite (exit code 4 otherwise).

    The device is added with --role (writer by default), as recorded here: the ticket names the
    role so the new device can show it, but editing the ticket changes nothing.

    The ticket is single use and expires after --ttl seconds; it holds a one-time secret, so
    hand it over privately. The new device runs `syncdevice join --init TICKET`. Before the
    add, the document is stored encrypted for the new device on a quorum of syncnodes, so it
    gets it even if this device goes away right after. With --wait 0 (or when --wait runs
    out) the add happens whenever this device next runs any syncdevice command."""

    async def go(device: Any) -> int | None:
        from proto.manifest import Role

        d = device.document(doc)
        ticket = d.invite(ttl=ttl, role=Role[role.upper()])
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


@click.command()
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

            say(f"the ticket invites this device as a "
                f"{InviteTicket.parse(ticket).role.name.lower()}")
            d = await device.join(ticket, name=name, timeout=timeout, progress=say,
                                  on_progress=bytes_progress)
        role = next(m.role for m in d.members() if m.is_self)
        ctx.out(f"joined {d.name} {d.id} as {role}",
                {"name": d.name, "id": d.id, "epoch": d.epoch, "role": role})

    run_device(ctx, go, create=create)


@click.command()
@click.argument("doc")
@click.argument("device_id")
@pass_ctx
def remove(ctx: Ctx, doc: str, device_id: str) -> None:
    """Remove DEVICE_ID (an id prefix from `members`) from the document."""

    async def go(device: Any) -> None:
        slot = await device.document(doc).remove_device(device_id)
        ctx.out(f"removed {device_id} at epoch {slot}", {"epoch": slot})

    run_device(ctx, go)


@click.command()
@click.argument("doc")
@click.argument("device_id")
@click.argument("role", type=click.Choice(ROLES))
@pass_ctx
def role(ctx: Ctx, doc: str, device_id: str, role: str) -> None:
    """Give DEVICE_ID (an id prefix from `members`) ROLE: admin (changes membership and roles),
    writer (edits) or reader (receives only). Admins only (exit code 4 otherwise); the last
    admin cannot be demoted: make another member admin first."""

    async def go(device: Any) -> None:
        slot = await device.document(doc).set_role(device_id, role)
        ctx.out(f"{device_id} is now {role} (epoch {slot})", {"epoch": slot, "role": role})

    run_device(ctx, go)


@click.command()
@click.argument("doc")
@pass_ctx
def leave(ctx: Ctx, doc: str) -> None:
    """Leave the document: ask its admins to remove this device, and stop syncing it here.

    A device cannot remove itself (MLS forbids it), so the request is left for the admins on a
    quorum of syncnodes, and the first admin device online removes this one. The document
    stops syncing here at once (status `left`). The last admin cannot leave while others
    remain (exit code 4): make another member admin first (`syncdevice role DOC DEVICE
    admin`)."""

    async def go(device: Any) -> None:
        d = device.document(doc)
        await d.leave()
        ctx.out(f"left {d.name}; an admin removes this device", {"status": d.status})

    run_device(ctx, go)


@click.command()
@click.argument("doc")
@pass_ctx
def rotate(ctx: Ctx, doc: str) -> None:
    """Rotate the document's keys (an MLS key update through Paxos)."""

    async def go(device: Any) -> None:
        slot = await device.document(doc).rotate_keys()
        ctx.out(f"keys rotated; epoch {slot}", {"epoch": slot})

    run_device(ctx, go)


@click.command()
@click.argument("doc")
@pass_ctx
def compact(ctx: Ctx, doc: str) -> None:
    """Compact the document's history on its syncnodes.

    Stores the whole document (encrypted) on a quorum of the syncnodes, then commits a
    compaction point through Paxos. Once it is decided, the syncnodes delete every update the
    state covers, and devices that were offline catch up from the state plus the updates
    since. Writers and admins; it also happens by itself (every 10,000 updates or 64 MiB).
    Exits 0 also when a compaction decided meanwhile covers this one, 1 when the state was
    not stored by a quorum in time or no quorum decided (offline), 4 for a reader."""

    async def go(device: Any) -> None:
        d = device.document(doc)
        slot = await d.compact()
        if slot is None:
            ctx.out("a compaction decided meanwhile already covers this one",
                    {"epoch": d.epoch, "compacted": False})
        else:
            ctx.out(f"compacted; epoch {slot}", {"epoch": slot, "compacted": True})

    run_device(ctx, go)
