"""``syncdevice export`` / ``import``: a document as a JSON file, and back as a new document.

The file holds the document's plain value (for people and other tools), its CRDT snapshot
(base64) from which ``import`` rebuilds it exactly, and its id, name and CRDT type. It is the
document **in plain text**: it is written with mode 0600.

Importing creates a new document (a new MLS group, new id) and merges the snapshot into it as
one **local edit** (:func:`import_snapshot_as_local_change`), so the content is stored, sent to
the syncnodes and synced to future members like any edit. The CRDT history comes along, so the
imported document's text, lists, maps and counters keep their types.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from device.cli_support import WAIT, CliError, Ctx, pass_ctx, progress, run_device, settle
from proto.crdt import CrdtError

FORMAT = "syncdevice-export/1"


class ExportError(ValueError):
    """The file is not a usable export."""


@dataclass(frozen=True)
class Export:
    name: str
    id: str
    crdt: str
    backend: str
    snapshot: bytes


def export_document(doc: Any) -> dict[str, Any]:
    """The JSON object written by ``syncdevice export``."""
    return {"format": FORMAT, "id": doc.id, "name": doc.name, "crdt": doc.crdt_type,
            "backend": doc.crdt.backend_id, "value": doc.value(),
            "snapshot": base64.b64encode(doc.crdt.snapshot()).decode("ascii")}


def write_private(path: Path, text: str, *, overwrite: bool) -> None:
    """Write ``text`` to ``path`` with mode 0600 (atomically: a temporary file, renamed)."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (--force overwrites it)")
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_export(path: Path) -> Export:
    """Parse and check an export file (the snapshot itself is checked by the backend)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{path} is not a syncdevice export ({FORMAT})")
    try:
        fields = {k: data[k] for k in ("name", "id", "crdt", "backend", "snapshot")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise ExportError(f"{path}: name, id, crdt, backend and snapshot must be strings")
        snapshot = base64.b64decode(fields.pop("snapshot"), validate=True)
    except KeyError as exc:
        raise ExportError(f"{path}: missing {exc.args[0]!r}") from None
    except binascii.Error as exc:
        raise ExportError(f"{path}: snapshot is not base64: {exc}") from None
    return Export(snapshot=snapshot, **fields)


def check_snapshot(export: Export) -> None:
    """Raise :class:`CrdtError` unless a backend of ``export.crdt`` loads the snapshot (before
    anything is created from it)."""
    from device.crdt_loro import BACKENDS

    factory = BACKENDS.get(export.crdt)
    if factory is None:
        raise CrdtError(f"unknown CRDT type {export.crdt!r} (available: {', '.join(BACKENDS)})")
    backend = factory(0, export.snapshot)
    if backend.backend_id != export.backend:
        raise CrdtError(f"snapshot of backend {export.backend!r}, this device has "
                        f"{backend.backend_id!r}")


def import_snapshot_as_local_change(doc: Any, snapshot: bytes) -> None:
    """Merge ``snapshot`` into ``doc`` as one local edit: applied, saved and sent like any
    ``doc.change``. Check it with :func:`check_snapshot` first."""
    doc.change(lambda editor: editor.merge(snapshot))


@click.command()
@click.argument("doc")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@pass_ctx
def export(ctx: Ctx, doc: str, file: Path, force: bool) -> None:
    """Write DOC to FILE as JSON: its plain value, its CRDT snapshot (base64), id, name and
    CRDT type. The file holds the content in plain text (mode 0600). `syncdevice import FILE`
    makes a new document from it."""
    async def go(device: Any) -> None:
        d = device.document(doc)
        if not d.state_loaded.is_set():
            raise CliError(f"{d.name}: the content has not arrived from a member yet")
        try:
            write_private(file, json.dumps(export_document(d), indent=1, ensure_ascii=False,
                                           sort_keys=True) + "\n", overwrite=force)
        except OSError as exc:
            raise CliError(f"cannot write {file}: {exc}") from None
        ctx.out(f"exported {d.name} {d.id} to {file}",
                {"name": d.name, "id": d.id, "file": str(file)})

    run_device(ctx, go)


@click.command(name="import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--syncnode", "syncnodes", multiple=True, required=True, metavar="TICKET",
              help="A syncnode ticket (sn1...) for the new document; repeat for each.")
@click.option("--name", default=None, help="A local name (default: the exported name).")
@WAIT
@pass_ctx
def import_(ctx: Ctx, file: Path, syncnodes: tuple[str, ...], name: str | None,
            wait: float) -> None:
    """Create a new document from an `export` FILE, served by the given syncnodes. It gets a
    new id; its content is sent like an edit (waits up to --wait s for a quorum)."""
    try:
        exported = read_export(file)
        check_snapshot(exported)  # a bad snapshot fails before anything is created
    except ExportError as exc:
        raise CliError(str(exc)) from None
    except CrdtError as exc:
        raise CliError(f"{file}: {exc}") from None
    local_name = name or exported.name

    async def go(device: Any) -> None:
        if any(d.name == local_name for d in device.documents()):
            raise CliError(f"a document named {local_name!r} exists here; pick another name "
                           "with --name")
        with progress(ctx, "creating the document..."):
            d = await device.create_document(list(syncnodes), crdt=exported.crdt,
                                             name=local_name)
            import_snapshot_as_local_change(d, exported.snapshot)
        with progress(ctx, "sending it to the syncnodes..."):
            await settle(d, wait)
        ctx.out(f"imported {d.name} {d.id} (exported from {exported.id[:16]})",
                {"name": d.name, "id": d.id, "from": exported.id})

    run_device(ctx, go)
