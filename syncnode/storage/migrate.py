"""``syncnode migrate-storage``: move a node's data from its SQLite database to PostgreSQL.

Everything moves, in one PostgreSQL transaction: groups, decided log and manifests, Paxos
acceptor records, envelopes with their per-sender summaries, compactions, evidence, hosting
records, the mailbox (item ids kept, so devices' ``after`` marks stay valid; its usage counts
are rebuilt by the triggers), address records, and the ``meta`` that makes the node the same
node: its storage **incarnation** and its **statement clock** (a node that moved must not sign
under a new incarnation, which devices would read as lost data, nor stamp below what it
stamped before). The target is bound to the node's key, like a first start.

Refused, changing nothing: a target that already holds groups, mailbox items or acceptor
records (merging two nodes' data is not a migration), and a source that a running syncnode
holds (its data dir lock): stop the node first. Afterwards every table's row count is checked
against the source, and the SQLite file is left as it was (keep it until the node runs well).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import psycopg

from syncnode.storage.postgres_schema import describe, preflight

TABLES: list[tuple[str, str]] = [
    ("groups", "group_id, creator, top_slot, bytes_used, created_at"),
    ("manifests", "group_id, epoch, manifest"),
    ("decided", "group_id, slot, value, certificate"),
    ("envelopes", "group_id, sender, seq, digest, envelope"),
    ("envelope_senders", "group_id, sender, count, top, contiguous, setsum"),
    ("address_records", "node_id, issued_at, record"),
    ("hosting", "group_id, named_slot, adoption, serving, history_complete, removed_slot, "
                "removed_at"),
    ("equivocations", "group_id, slot, proof"),
    ("compactions", "group_id, point"),
    ("compacted", "group_id, sender, seq"),
]
"""Copied as they are (``hosting``'s 0/1 become booleans); ``acceptor``, ``mailbox`` and
``meta`` are copied apart."""
MUST_BE_EMPTY = ("groups", "mailbox", "acceptor", "address_records")


class MigrationError(Exception):
    """One line: what is wrong and what to do."""


def migrate_storage(source: Path, target: str, node_id: bytes,
                    echo: Callable[[str], None] = print) -> dict[str, int]:
    """Copy the SQLite database at ``source`` into the PostgreSQL database at ``target``;
    returns the rows copied per table."""
    if not source.exists():
        raise MigrationError(f"{source} does not exist")
    try:
        preflight(target, node_id)
    except RuntimeError as exc:
        raise MigrationError(str(exc)) from None
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        row = src.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None or row[0] != "3":
            raise MigrationError(f"{source}: schema version {row and row[0]}, expected 3: start "
                                 "it once with this syncnode (which upgrades it), stop it, then "
                                 "migrate")
        with psycopg.connect(target) as dst:  # one transaction: all or nothing
            for table in MUST_BE_EMPTY:
                got = dst.execute(f"SELECT count(*) FROM {table}").fetchone()  # type: ignore
                if got and got[0]:
                    raise MigrationError(f"PostgreSQL {describe(target)} already holds data "
                                         f"({table}); migrate into an empty database")
            copied = _copy(src, dst, echo)
            _check(dst, copied)
    except sqlite3.Error as exc:
        raise MigrationError(f"{source}: {exc}") from None
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MigrationError(f"PostgreSQL {describe(target)}: {first}") from None
    finally:
        src.close()
    return copied


def _copy(src: sqlite3.Connection, dst: psycopg.Connection, echo: Callable[[str], None]
          ) -> dict[str, int]:
    copied: dict[str, int] = {}
    for table, columns in TABLES:
        copied[table] = _copy_rows(dst, table, columns, src.execute(
            f"SELECT {columns} FROM {table}"),
            (lambda r: (*r[:3], bool(r[3]), bool(r[4]), *r[5:])) if table == "hosting"
            else None)
        echo(f"  {table}: {copied[table]} rows")
    copied["acceptor"] = _copy_rows(
        dst, "acceptor", "group_id, slot, record, record_hash",
        src.execute("SELECT group_id, slot, record FROM acceptor"),
        lambda r: (*r, hashlib.blake2b(r[2], digest_size=32).digest()))
    echo(f"  acceptor: {copied['acceptor']} rows")
    with dst.cursor() as cur:
        n = 0
        with cur.copy("COPY mailbox (item_id, recipient, kind, payload, expires_at, sender, "
                      "size) FROM STDIN") as cp:
            for r in src.execute("SELECT item_id, recipient, kind, payload, expires_at, sender, "
                                 "size FROM mailbox ORDER BY item_id"):
                cp.write_row(r)
                n += 1
        copied["mailbox"] = n
    # COPY bypasses the usage triggers: rebuild the usage from the items, as they would.
    dst.execute("DELETE FROM mailbox_usage")
    dst.execute("INSERT INTO mailbox_usage SELECT sender, sum(size), count(*) FROM mailbox "
                "GROUP BY sender")
    dst.execute("INSERT INTO mailbox_usage SELECT sn_mailbox_class(kind) AS who, sum(size), "
                "count(*) FROM mailbox GROUP BY who")
    dst.execute("SELECT setval(pg_get_serial_sequence('mailbox', 'item_id'), greatest("
                "(SELECT max(item_id) FROM mailbox), (SELECT coalesce(seq, 0) FROM "
                "(VALUES (%s::bigint)) v(seq)), 1))", (_sqlite_next_id(src),))
    echo(f"  mailbox: {copied['mailbox']} items")
    for key in ("incarnation", "statement_clock"):
        row = src.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is not None:
            dst.execute("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET "
                        "value = excluded.value", (key, row[0]))
    return copied


def _copy_rows(dst: psycopg.Connection, table: str, columns: str, rows: sqlite3.Cursor,
               convert: Callable[[tuple[object, ...]], tuple[object, ...]] | None) -> int:
    n = 0
    with dst.cursor() as cur, cur.copy(f"COPY {table} ({columns}) FROM STDIN") as cp:  # type: ignore
        for r in rows:
            cp.write_row(convert(r) if convert else r)
            n += 1
    return n


def _sqlite_next_id(src: sqlite3.Connection) -> int:
    """The highest mailbox id SQLite ever gave (AUTOINCREMENT never reuses one, not even a
    deleted item's), so ids on PostgreSQL continue above it."""
    try:
        row = src.execute("SELECT seq FROM sqlite_sequence WHERE name='mailbox'").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def _check(dst: psycopg.Connection, copied: dict[str, int]) -> None:
    for table, n in copied.items():
        got = dst.execute(f"SELECT count(*) FROM {table}").fetchone()  # type: ignore
        if not got or got[0] != n:
            raise MigrationError(f"{table}: copied {n} rows but PostgreSQL holds "
                                 f"{got and got[0]}; nothing was migrated")
