"""The shared benchmark data (``../shared/data``), for tests and benchmarks."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device.document import Document

DATA_DIR = Path(os.environ.get("SYNCNODE_DATA",
                               Path(__file__).resolve().parents[2] / "shared" / "data"))


def editing_trace() -> tuple[list[tuple[int, int, str]], str]:
    """The automerge-perf editing trace (259,778 edits): ``(pos, delete, insert)`` patches and
    the final text. Set ``SYNCNODE_DATA`` if the data directory is elsewhere."""
    data = json.loads(gzip.decompress((DATA_DIR / "automerge-paper.json.gz").read_bytes()))
    patches = [(p[0], p[1], p[2]) for txn in data["txns"] for p in txn["patches"]]
    return patches, data["endContent"]


def replay(doc: Document, patches: Sequence[tuple[int, int, str]], container: str,
           per_change: int, *, flush_each: bool = False) -> None:
    """Apply trace patches to text ``container`` of ``doc``, ``per_change`` edits per
    ``doc.change`` (one local update each); ``flush_each`` seals each into its own message."""
    for start in range(0, len(patches), per_change):
        chunk = patches[start:start + per_change]

        def apply(e: Any, chunk: Sequence[tuple[int, int, str]] = chunk) -> None:
            t = e.text(container)
            for pos, delete, insert in chunk:
                if delete:
                    t.delete(pos, delete)
                if insert:
                    t.insert(pos, insert)

        doc.change(apply)
        if flush_each:
            doc.flush()
