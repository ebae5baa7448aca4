"""Where a syncnode keeps its data: the :class:`Storage` interface (:mod:`.base`) and its
implementations (:mod:`.sqlite`, the default). Only the implementations hold SQL."""

import sqlite3
from collections.abc import Iterator
from typing import Any

from syncnode.storage.base import (
    JOIN_REQUEST_KIND,
    MAILBOX_ITEM_OVERHEAD,
    BatchHook,
    DecidedRecord,
    GroupRecord,
    MailboxPutResult,
    MailboxQuota,
    MailboxRecord,
    MailboxRefusal,
    MailboxUsage,
    Storage,
    StorageClosed,
    StorageConflict,
)

# Transitional, until the service reaches its data only through Storage (the next change):
# what the service, mailbox, address book and peer sync still use directly.
from syncnode.storage.sqlite_schema import open_database, storage_bytes
from syncnode.storage.sqlite_writer import Writer


def rows(conn: sqlite3.Connection, sql: str, *args: Any) -> Iterator[tuple[Any, ...]]:
    yield from conn.execute(sql, args)


def one(conn: sqlite3.Connection, sql: str, *args: Any) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = conn.execute(sql, args).fetchone()
    return row


__all__ = [
    "JOIN_REQUEST_KIND",
    "MAILBOX_ITEM_OVERHEAD",
    "BatchHook",
    "DecidedRecord",
    "GroupRecord",
    "MailboxPutResult",
    "MailboxQuota",
    "MailboxRecord",
    "MailboxRefusal",
    "MailboxUsage",
    "Storage",
    "StorageClosed",
    "StorageConflict",
    "Writer",
    "one",
    "open_database",
    "rows",
    "storage_bytes",
]
