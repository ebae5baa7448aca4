"""``syncdevice create --members-of DOC``: the part after the document exists (the flow itself
is :mod:`device.group_docs`).

The new document's creator is the inviter of every member of DOC: a member's join request is
admitted only while this device runs. So ``create`` stays online (up to ``--wait`` seconds)
until the offer is stored by a quorum of DOC's syncnodes and every member whose device is
running has joined; it then says who joined and how the others will.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import trio

from device.cli_support import send_pending
from device.document import Document
from device.group_docs import seated
from proto.identity import short_id


async def admit_members(doc: Document, source: Document, wait: float,
                        update: Callable[[str], None]) -> dict[str, Any]:
    """Wait up to ``wait`` s for the offer to be durable and ``source``'s members to join
    ``doc``; what happened, for ``--json``."""
    deadline = trio.current_time() + wait
    await send_pending(source, deadline)
    with trio.move_on_at(deadline):
        while seated(doc, source)[1]:
            joined, missing = seated(doc, source)
            update(f"{len(joined)} of {len(joined) + len(missing)} members of {source.name} "
                   "joined...")
            await doc.wait_epoch(doc.epoch + 1)
    joined, missing = seated(doc, source)
    s = source.sync_status()
    return {"members_of": source.id, "joined": sorted(short_id(f) for f in joined),
            "waiting": sorted(short_id(f) for f in missing),
            "offer_pending": bool(s.unsent or s.outbox), "source_name": source.name}


def report_members(offered: dict[str, Any], wait: float) -> None:
    """The lines on stderr that say what :func:`admit_members` found."""
    name = offered["source_name"]
    if offered["offer_pending"]:
        click.echo(f"the offer to the members of {name} is saved but not yet stored by a quorum "
                   f"of {name}'s syncnodes; it is sent the next time syncdevice runs with them "
                   "reachable", err=True)
    waiting = offered["waiting"]
    if waiting:
        total = len(waiting) + len(offered["joined"])
        click.echo(f"{len(offered['joined'])} of {total} members of {name} joined within "
                   f"{wait:g} s; the others ({', '.join(waiting)}) join when their device runs "
                   f"(`syncdevice watch {name}`, or an app) while this one does (e.g. "
                   "`syncdevice watch` on the new document)", err=True)
