"""Which storage a location names: a ``postgresql://`` URL is the server database (which
several processes of one node may share, :mod:`.postgres`), anything else the path of a SQLite
database (:mod:`.sqlite`, the embedded default). psycopg is imported only for the former."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from syncnode.storage.base import Storage
from syncnode.storage.sqlite import SqliteStorage

SCHEMES = ("postgresql://", "postgres://")


def is_postgres(where: str | PathLike[str]) -> bool:
    return isinstance(where, str) and where.startswith(SCHEMES)


def open_storage(where: str | PathLike[str], *, group_commit: bool = True, threads: bool = True
                 ) -> Storage:
    """The storage at ``where`` (not started: run it with ``nursery.start(storage.run)``)."""
    if is_postgres(where):
        from syncnode.storage.postgres import PostgresStorage

        return PostgresStorage(str(where), batching=group_commit)
    return SqliteStorage(Path(where), batching=group_commit, threads=threads)
