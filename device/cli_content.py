"""``syncdevice show``, ``set``, ``edit`` and ``watch``: reading and editing a document's content.

Commands of :mod:`device.cli` (registered there), on the shared machinery of
:mod:`device.cli_support`. An edit is saved locally first, then waits (``--wait``) until a
quorum of syncnodes stored it (:func:`device.cli_support.settle`).
"""

from __future__ import annotations

import json
from typing import Any

import click
import trio

from device.cli_support import WAIT, Ctx, pass_ctx, progress, run_device, settle
from device.events import Alarm, NewDocument


@click.command()
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


@click.command(name="set")
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


@click.command()
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


@click.command()
@click.argument("doc")
@click.option("--for", "duration", type=float, default=None,
              help="Stop after this many seconds (default: until Ctrl-C).")
@pass_ctx
def watch(ctx: Ctx, doc: str, duration: float | None) -> None:
    """Print the document, then every change as it arrives (also sends pending edits).

    While it runs, this device also joins the documents an admin makes from the members of
    any of its documents (`create --members-of`), and says so for this one."""

    async def go(device: Any) -> None:
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
                    if isinstance(ev, NewDocument):
                        ctx.out(f"NEW DOCUMENT {ev.name} {ev.id} (made from this one's members "
                                f"by {ev.sender}; this device joined it)",
                                {"event": "new-document", "id": ev.id, "name": ev.name,
                                 "sender": ev.sender})
                        continue
                    value = d.value()
                    ctx.out(f"[{ev.origin} {','.join(ev.senders)}] "
                            f"{json.dumps(value, sort_keys=True, ensure_ascii=False)}",
                            {"event": "change", "origin": ev.origin,
                             "senders": list(ev.senders), "value": value})

    run_device(ctx, go, join_offers=True)
