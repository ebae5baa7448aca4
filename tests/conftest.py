from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio.testing

from syncnode.procs import NodeProcess, start_cluster


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead whenever every task is blocked (pytest-trio uses it)."""
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """Three real ``syncnode run`` processes on loopback, killed after the test."""
    cluster = start_cluster(tmp_path, 3)
    try:
        yield cluster
    finally:
        for n in cluster:
            n.stop()
