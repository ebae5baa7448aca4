"""PostgreSQL for tests: where the server comes from, and a fresh schema per test.

The server: ``SYNCNODE_TEST_POSTGRES`` (a DSN; ``.ci/run`` starts a throwaway cluster with
``scripts/pg_throwaway.sh`` and exports it), else a throwaway cluster this test session starts
with the same script when the PostgreSQL server binaries are installed (stopped at the end),
else the PostgreSQL tests skip, saying why. Under CI (``CI=true``) a missing server is a
failure, never a skip: CI must run them.

Each test gets its own schema (``search_path`` in the DSN's options), so tests never see each
other's data and cost a ``CREATE SCHEMA`` instead of a ``CREATE DATABASE``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ENV = "SYNCNODE_TEST_POSTGRES"
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pg_throwaway.sh"


def _server_binaries() -> bool:
    return bool(os.environ.get("PG_BIN") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
                or shutil.which("initdb"))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"PostgreSQL tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The DSN of a PostgreSQL server for this test session (see the module doc)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed")
    dsn = os.environ.get(ENV)
    if dsn and not dsn.startswith(("postgresql://", "postgres://")):
        pytest.fail(f"{ENV} must be a postgresql:// URL, got {dsn!r}", pytrace=False)
    if dsn:
        yield dsn
        return
    if not _server_binaries():
        _unavailable(f"set {ENV} to a DSN, or install the PostgreSQL server "
                     "(apt-get install -y postgresql) so tests start a throwaway cluster")
    root = Path(tempfile.mkdtemp(prefix="syncnode-pg-"))
    started = subprocess.run([str(SCRIPT), "start", str(root)], capture_output=True, text=True,
                             timeout=120)
    if started.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(f"the throwaway cluster did not start: {started.stderr.strip()[-500:]}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(SCRIPT), "stop", str(root)], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def with_schema(dsn: str, schema: str) -> str:
    """``dsn`` (a ``postgresql://`` URL, as syncnode takes) with its connections working in
    ``schema``."""
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-c search_path={schema}"))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def new_schema(dsn: str, name: str) -> str:
    """Create an empty schema (dropping one of that name) and return a DSN that uses it."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')  # type: ignore[arg-type]
        conn.execute(f'CREATE SCHEMA "{name}"')  # type: ignore[arg-type]
    return with_schema(dsn, name)


_counter = iter(range(1 << 30))


@pytest.fixture
def pg_dsn(pg_server: str) -> str:
    """A DSN over a new, empty schema for this test."""
    return new_schema(pg_server, f"t{os.getpid()}_{next(_counter)}")
