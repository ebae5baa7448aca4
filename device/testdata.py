"""The shared benchmark data (``../shared/data``), for tests and benchmarks."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("SYNCNODE_DATA",
                               Path(__file__).resolve().parents[2] / "shared" / "data"))


def editing_trace() -> tuple[list[tuple[int, int, str]], str]:
    """The automerge-perf editing trace (259,778 edits): ``(pos, delete, insert)`` patches and
    the final text. Set ``SYNCNODE_DATA`` if the data directory is elsewhere."""
    data = json.loads(gzip.decompress((DATA_DIR / "automerge-paper.json.gz").read_bytes()))
    patches = [(p[0], p[1], p[2]) for txn in data["txns"] for p in txn["patches"]]
    return patches, data["endContent"]
