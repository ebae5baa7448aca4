"""``syncdevice syncnode list|add|remove|replace``: which syncnodes serve a document.

Commands of :mod:`device.cli` (registered there). Changing the set is for admins and goes
through Paxos like any membership change (:mod:`device.federation`): ``add`` returns once the
new syncnode holds the document's history, ``remove`` refuses while the remaining ones do not,
and ``replace`` is both, in that order. Moving a document to other operators is one
``replace`` per syncnode.
"""

from __future__ import annotations

from typing import Any

import click

from device.cli_support import CliError, Ctx, pass_ctx, progress, run_device
from proto.errors import DecodeError
from proto.identity import short_id
from proto.ticket import NodeTicket


def _ticket(text: str) -> NodeTicket:
    try:
        return NodeTicket.parse(text)
    except DecodeError as exc:
        raise CliError(f"bad syncnode ticket: {exc}") from None


WAIT_HELP = ("Seconds to wait for the new syncnode to receive the document's history (it keeps "
             "pulling it after that; `syncdevice syncnode list` shows when it holds it).")


@click.group()
def syncnode() -> None:
    """List or change the syncnodes that serve a document (changes: admins only).

    \b
    syncdevice syncnode list DOC
    syncdevice syncnode add DOC TICKET
    syncdevice syncnode remove DOC NODE_ID
    syncdevice syncnode replace DOC OLD_NODE_ID NEW_TICKET
    """


@syncnode.command("list")
@click.argument("doc")
@click.option("--timeout", default=5.0, show_default=True,
              help="Seconds to reach the syncnodes and ask each whether it holds the history.")
@pass_ctx
def list_(ctx: Ctx, doc: str, timeout: float) -> None:
    """The document's syncnodes: reachable or not, and whether each holds its history."""

    async def go(device: Any) -> None:
        import trio

        d = device.document(doc)
        with trio.move_on_after(timeout):
            await d.wait_connected(len(d.manifest.syncnodes))
        rows = []
        for e in d.manifest.syncnodes:
            done = await d.federation.history_status(e.node_id)
            rows.append({"node_id": e.node_id.hex(), "linked": e.node_id in d.clients,
                         "history": {True: "complete", False: "pulling", None: "unknown"}[done]})
        ctx.out("\n".join(f"{short_id(bytes.fromhex(r['node_id']))}  "
                          f"{'reachable  ' if r['linked'] else 'unreachable'}  "
                          f"history {r['history']}" for r in rows), rows)

    run_device(ctx, go)


@syncnode.command()
@click.argument("doc")
@click.argument("ticket")
@click.option("--wait", default=600.0, show_default=True, help=WAIT_HELP)
@pass_ctx
def add(ctx: Ctx, doc: str, ticket: str, wait: float) -> None:
    """Add the syncnode of TICKET to DOC; returns once it holds the document's history."""
    t = _ticket(ticket)

    async def go(device: Any) -> None:
        d = device.document(doc)
        with progress(ctx, "adding the syncnode...") as status:
            slot = await d.add_syncnode(t, wait=wait, say=status.say)
        ctx.out(f"syncnode {short_id(t.node_id)} added at epoch {slot}; it holds the history",
                {"node_id": t.node_id.hex(), "epoch": slot})

    run_device(ctx, go)


@syncnode.command()
@click.argument("doc")
@click.argument("node_id")
@pass_ctx
def remove(ctx: Ctx, doc: str, node_id: str) -> None:
    """Remove syncnode NODE_ID (a prefix of its id) from DOC, once the others hold the
    history. It refuses the document from then on and deletes its copy after its grace
    period."""

    async def go(device: Any) -> None:
        d = device.document(doc)
        with progress(ctx, "removing the syncnode...") as status:
            slot = await d.remove_syncnode(node_id, say=status.say)
        ctx.out(f"syncnode removed at epoch {slot}", {"epoch": slot})

    run_device(ctx, go)


@syncnode.command()
@click.argument("doc")
@click.argument("old")
@click.argument("ticket")
@click.option("--wait", default=600.0, show_default=True, help=WAIT_HELP)
@pass_ctx
def replace(ctx: Ctx, doc: str, old: str, ticket: str, wait: float) -> None:
    """Replace syncnode OLD (id prefix) of DOC by the syncnode of TICKET: add the new one,
    wait until it holds the history, then remove the old one. Safe to run again if
    interrupted."""
    t = _ticket(ticket)

    async def go(device: Any) -> None:
        d = device.document(doc)
        with progress(ctx, "replacing the syncnode...") as status:
            added, removed = await d.replace_syncnode(old, t, wait=wait, say=status.say)
        ctx.out(f"syncnode {short_id(t.node_id)} added at epoch {added}, {old} removed at "
                f"epoch {removed}", {"node_id": t.node_id.hex(), "added": added,
                                     "removed": removed})

    run_device(ctx, go)
