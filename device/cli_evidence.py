"""``syncdevice alarms`` and ``syncdevice verify-evidence``: what a document's alarms say, and
checking a withholding proof (or a syncnode-reset's evidence) on its own.

A ``withholding`` alarm carries a :class:`proto.holdings.WithholdingProof`: two statements one
syncnode signed (that it held an update, and later that it did not). ``alarms --export DIR``
writes each alarm's evidence to a file; ``verify-evidence FILE`` checks such a file with
nothing but the proof (the syncnode's node id is inside it, and it must have signed both
statements), so anyone -- the syncnode's operator, another member, a third party -- can check
what it proves without the document, its keys or a network. A ``syncnode-reset`` alarm's
evidence (:class:`proto.resets.StorageReset`: two statements of one syncnode under two
incarnations of its storage) is checked the same way; it proves the node lost its data, not
that it withheld.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from device.cli_support import CliError, Ctx, pass_ctx, run_device
from proto.codec import decode
from proto.errors import SyncnodeError
from proto.holdings import ProofError, WithholdingProof, verify
from proto.resets import ResetError, StorageReset, verify_reset

MAX_EVIDENCE = 4 * 1024 * 1024
"""Largest evidence file read (a proof is two statements: well under 1 MiB)."""
DOES_NOT_PROVE = 5
"""Exit code of ``verify-evidence`` for a proof that does not verify (listed in
:data:`device.cli_support.EXIT_CODES`)."""


@click.command()
@click.argument("doc", required=False)
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write each alarm's evidence to DIR/<doc>-<n>-<kind>.proof (mode 0600).")
@pass_ctx
def alarms(ctx: Ctx, doc: str | None, export_dir: Path | None) -> None:
    """The alarms of DOC (or of every document): equivocation, withholding (with a proof that
    `syncdevice verify-evidence` checks), withholding-suspected, invalid-decision, ..."""

    async def go(device: Any) -> None:
        docs = [device.document(doc)] if doc else device.documents()
        rows = []
        for d in docs:
            for n, (kind, detail, evidence) in enumerate(d.replica.alarm_records(), 1):
                row: dict[str, Any] = {"doc": d.name, "kind": kind, "detail": detail,
                                       "evidence": None}
                if evidence is not None and export_dir is not None:
                    row["evidence"] = _write(export_dir / f"{d.id[:16]}-{n}-{kind}.proof",
                                             evidence)
                rows.append(row)
        ctx.out("\n".join(f"{r['doc']:<16} {r['kind']:<22} {r['detail']}"
                          + (f"\n{'':<16} evidence: {r['evidence']}" if r["evidence"] else "")
                          for r in rows) or "no alarms", rows)

    run_device(ctx, go)


def _write(path: Path, evidence: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(evidence)
    return str(path)


@click.command(name="verify-evidence")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@pass_ctx
def verify_evidence(ctx: Ctx, file: str) -> None:
    """Check a withholding proof in FILE (- for stdin; binary, as `alarms --export` writes it,
    or hex) on its own, and print what it proves; a syncnode-reset alarm's evidence too. Needs
    no device, key or network. Exits 0 when it verifies, 5 when it does not, 1 when FILE is
    neither."""
    try:
        if file == "-":
            raw = sys.stdin.buffer.read(MAX_EVIDENCE + 1)
        else:
            with open(file, "rb") as f:
                raw = f.read(MAX_EVIDENCE + 1)
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror}") from None
    if len(raw) > MAX_EVIDENCE:
        raise CliError(f"{file} is larger than {MAX_EVIDENCE} bytes: not a proof")
    text = raw.strip()
    if text and all(c in b"0123456789abcdefABCDEF" for c in text):
        raw = bytes.fromhex(text.decode())
    try:
        proof = decode(raw)
    except SyncnodeError as exc:
        raise CliError(f"{file} is not a withholding proof ({exc})") from None
    if isinstance(proof, StorageReset):
        _verify_reset(ctx, proof)
        return
    if not isinstance(proof, WithholdingProof):
        raise CliError(f"{file} holds a {type(proof).__name__}, not a withholding proof")
    try:
        finding = verify(proof)
    except ProofError as exc:
        ctx.out(f"DOES NOT VERIFY: {exc}", {"verified": False, "error": str(exc)})
        sys.exit(DOES_NOT_PROVE)
    ctx.out(f"VERIFIED: {finding.describe()}",
            {"verified": True, "node_id": finding.node_id.hex(),
             "group_id": finding.group_id.hex(), "sender": finding.sender.hex(),
             "seq": finding.seq, "held_at": finding.held_at, "lack_at": finding.lack_at,
             "held": finding.held_kind, "lack": finding.lack_kind})


def _verify_reset(ctx: Ctx, evidence: StorageReset) -> None:
    try:
        reset = verify_reset(evidence)
    except ResetError as exc:
        ctx.out(f"DOES NOT VERIFY: {exc}", {"verified": False, "error": str(exc)})
        sys.exit(DOES_NOT_PROVE)
    ctx.out(f"VERIFIED (a reset, not withholding): {reset.describe()}",
            {"verified": True, "reset": True, "node_id": reset.node_id.hex(),
             "old_incarnation": reset.old_incarnation.hex(),
             "new_incarnation": reset.new_incarnation.hex()})
