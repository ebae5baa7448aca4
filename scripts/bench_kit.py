"""What the benchmark scripts share: where the peer systems live (and installing them once),
percentiles, and CPU seconds of a process (the figure a busy machine distorts least)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO.parent / "shared" / "peers"
"""``../shared/peers`` beside the checkout (as in CI): etcd, Automerge, y-websocket."""


def pct(xs: list[float], p: float) -> float:
    """The ``p``-th percentile, nearest rank (no interpolation between two samples)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process so far (this one by default)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def ensure_peers() -> None:
    """Install the peer systems with their ``setup.sh`` the first time (a few minutes; it
    needs the package registries). Raises SystemExit with a one-line reason when it cannot."""
    if not PEERS.is_dir():
        raise SystemExit(f"error: the peer systems are not at {PEERS}")
    ready = ((PEERS / "yjs/node_modules").is_dir() and (PEERS / "venv/bin/python").exists()
             and shutil.which("etcd") is not None)
    if not ready:
        print(f"setting up the peers: {PEERS / 'setup.sh'} (once)", file=sys.stderr)
        if subprocess.run(["bash", str(PEERS / "setup.sh")], timeout=1800).returncode != 0:
            raise SystemExit(f"error: {PEERS / 'setup.sh'} failed (see its output above)")
