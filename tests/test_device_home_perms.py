"""The device home is private to its owner (issue 14, finding 8): ``device.db`` holds the MLS
signing secret and the endpoint seed, so the directory is 0700 and every file the store keeps
there (SQLite's -wal and -shm included) 0600, whatever the umask; a home made wider by an older
version is narrowed, with a warning that says what changed."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from device.agent import init_identity
from device.store import Store


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The common default umask (022), under which files are created world-readable unless
    the code asks otherwise."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_home_and_every_file_in_it_are_private(tmp_path: Path, open_umask: None) -> None:
    home = tmp_path / "new" / "device"
    store = Store(home)
    try:
        init_identity(store)  # the secrets, written through the WAL
        files = {p.name: mode(p) for p in home.iterdir()}
        assert {"lock", "device.db", "device.db-wal", "device.db-shm"} <= set(files)
        assert mode(home) == 0o700
        assert files == dict.fromkeys(files, 0o600)
    finally:
        store.close()


def test_a_wider_home_is_narrowed_with_a_warning(tmp_path: Path, open_umask: None) -> None:
    home = tmp_path / "device"
    store = Store(home)
    init_identity(store)
    store.close()
    home.chmod(0o755)  # as older versions left it
    for name in ("device.db", "lock"):
        (home / name).chmod(0o644)
    with capture_logs() as logs:
        store = Store(home)
    try:
        assert mode(home) == 0o700
        assert mode(home / "device.db") == mode(home / "lock") == 0o600
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1
        assert sorted(warnings[0]["changed"]) == sorted([
            f"{home} 0755 -> 0700", f"{home / 'device.db'} 0644 -> 0600",
            f"{home / 'lock'} 0644 -> 0600"])
    finally:
        store.close()
    with capture_logs() as logs:  # once private, nothing more to say
        Store(home).close()
    assert not [e for e in logs if e["log_level"] == "warning"]
