"""SQLite schema of a syncnode: tables, migrations, opening a database, its size on disk.

One file (``syncnode.db`` in the data dir) in WAL mode with ``synchronous=FULL``: a commit is
on disk when it returns. The schema version is checked at open (a database of another version
is refused, not guessed at) and additive changes are migrated in place
(:func:`_migrate_mailbox`; versions 1 and 2 to 3: :func:`_migrate_summary`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from proto import entropy
from proto.service import INCARNATION_BYTES
from syncnode.storage.base import MAILBOX_ITEM_OVERHEAD, SETSUM_MASK, digest_term

SCHEMA_VERSION = 3
"""2: ``envelope_senders``, the per-sender summary of each group's envelopes; 3: compaction
(``compactions``, ``compacted``)."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    group_id BLOB PRIMARY KEY,
    creator BLOB NOT NULL,          -- fingerprint of the genesis signer (quota accounting)
    top_slot INTEGER NOT NULL,      -- highest decided slot (0: only genesis)
    bytes_used INTEGER NOT NULL,    -- stored log values + envelopes (quota accounting)
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS groups_creator ON groups (creator);
CREATE TABLE IF NOT EXISTS manifests (   -- manifest of each epoch, from the decided log
    group_id BLOB NOT NULL, epoch INTEGER NOT NULL, manifest BLOB NOT NULL,
    PRIMARY KEY (group_id, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decided (     -- slot -> value + certificate (NULL for genesis)
    group_id BLOB NOT NULL, slot INTEGER NOT NULL, value BLOB NOT NULL, certificate BLOB,
    PRIMARY KEY (group_id, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS acceptor (    -- Paxos acceptor state per (group, slot)
    group_id BLOB NOT NULL, slot INTEGER NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (group_id, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS envelopes (
    group_id BLOB NOT NULL, sender BLOB NOT NULL, seq INTEGER NOT NULL,
    digest BLOB NOT NULL, envelope BLOB NOT NULL,
    PRIMARY KEY (group_id, sender, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS envelope_senders ( -- per (group, sender): add_to_summary keeps it
    group_id BLOB NOT NULL, sender BLOB NOT NULL,
    count INTEGER NOT NULL, top INTEGER NOT NULL, contiguous INTEGER NOT NULL,
    setsum INTEGER NOT NULL,
    PRIMARY KEY (group_id, sender)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailbox (
    item_id INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient BLOB NOT NULL, kind INTEGER NOT NULL, payload BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    sender BLOB NOT NULL DEFAULT X'',  -- member key fingerprint, or a join request's endpoint
    size INTEGER NOT NULL DEFAULT 0    -- bytes counted against the quotas (MAILBOX_SCHEMA)
);
CREATE INDEX IF NOT EXISTS mailbox_recipient ON mailbox (recipient, item_id);
CREATE TABLE IF NOT EXISTS address_records ( -- newest signed address record per syncnode
    node_id BLOB PRIMARY KEY, issued_at INTEGER NOT NULL, record BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hosting (    -- groups adopted after their genesis, or removed
    group_id BLOB PRIMARY KEY,
    named_slot INTEGER,             -- slot whose manifest first names this node (NULL: genesis)
    adoption BLOB,                  -- the service's encoded naming decision
    serving INTEGER NOT NULL,
    history_complete INTEGER NOT NULL,
    removed_slot INTEGER,
    removed_at REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS equivocations (
    group_id BLOB NOT NULL, slot INTEGER NOT NULL, proof BLOB NOT NULL,
    PRIMARY KEY (group_id, slot)
) WITHOUT ROWID;
""" + """
CREATE TABLE IF NOT EXISTS compactions (  -- the compaction point applied (schema 3)
    group_id BLOB PRIMARY KEY, point BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS compacted (    -- its covered vector: seqs 1..seq are in the state
    group_id BLOB NOT NULL, sender BLOB NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (group_id, sender)
) WITHOUT ROWID;
"""



MAILBOX_SCHEMA = """
CREATE INDEX IF NOT EXISTS mailbox_kind ON mailbox (kind, item_id);
CREATE INDEX IF NOT EXISTS mailbox_expiry ON mailbox (expires_at);
-- Live mailbox use per sender and per class (X'6a': join requests, X'6d': the rest), kept
-- exact by the triggers whatever deletes an item (ack, expiry, eviction).
CREATE TABLE IF NOT EXISTS mailbox_usage (
    who BLOB PRIMARY KEY, bytes INTEGER NOT NULL, items INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS mailbox_usage_in AFTER INSERT ON mailbox BEGIN
    INSERT INTO mailbox_usage VALUES (NEW.sender, NEW.size, 1) ON CONFLICT (who)
        DO UPDATE SET bytes = bytes + excluded.bytes, items = items + 1;
    INSERT INTO mailbox_usage VALUES (CASE WHEN NEW.kind = 1 THEN X'6a' ELSE X'6d' END,
                                      NEW.size, 1) ON CONFLICT (who)
        DO UPDATE SET bytes = bytes + excluded.bytes, items = items + 1;
END;
CREATE TRIGGER IF NOT EXISTS mailbox_usage_out AFTER DELETE ON mailbox BEGIN
    UPDATE mailbox_usage SET bytes = bytes - OLD.size, items = items - 1
        WHERE who IN (OLD.sender, CASE WHEN OLD.kind = 1 THEN X'6a' ELSE X'6d' END);
    DELETE FROM mailbox_usage WHERE who = OLD.sender AND items <= 0;
END;
"""


def _migrate_mailbox(conn: sqlite3.Connection) -> None:
    """Bring the mailbox of a database made by an older syncnode up to date: sender and size
    columns, the usage table (filled from the items already there) and its triggers. Additive,
    so the schema version stays: an older syncnode still runs on the result (what it puts
    then counts 0 bytes until it expires)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(mailbox)")}
    fresh = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                         "name='mailbox_usage'").fetchone() is None
    script = ["BEGIN IMMEDIATE;"]
    if "sender" not in columns:
        script.append("ALTER TABLE mailbox ADD COLUMN sender BLOB NOT NULL DEFAULT X'';")
    if "size" not in columns:
        script.append("ALTER TABLE mailbox ADD COLUMN size INTEGER NOT NULL DEFAULT 0;")
    script.append(MAILBOX_SCHEMA)
    if fresh:  # items an older syncnode stored count their payload from now on
        script.append(f"""
            UPDATE mailbox SET size = length(payload) + {MAILBOX_ITEM_OVERHEAD};
            DELETE FROM mailbox_usage;
            INSERT INTO mailbox_usage SELECT sender, sum(size), count(*) FROM mailbox
                GROUP BY sender;
            INSERT INTO mailbox_usage SELECT CASE WHEN kind = 1 THEN X'6a' ELSE X'6d' END
                AS who, sum(size), count(*) FROM mailbox GROUP BY who;""")
    script.append("COMMIT;")
    try:
        conn.executescript("\n".join(script))
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def add_to_summary(c: sqlite3.Connection, group_id: bytes, sender: bytes, seq: int,
                   digest: bytes) -> None:
    """Count a newly stored envelope in its sender's row of ``envelope_senders`` (inside the
    transaction that stored it). The contiguous mark moves on over what is stored after it:
    primary-key lookups, each seq passed over once in the life of the group."""
    row = c.execute("SELECT count, top, contiguous, setsum FROM envelope_senders WHERE "
                    "group_id=? AND sender=?", (group_id, sender)).fetchone()
    count, top, contiguous, setsum = row if row is not None else (0, 0, 0, 0)
    if seq == contiguous + 1:
        contiguous = seq
        while c.execute("SELECT 1 FROM envelopes WHERE group_id=? AND sender=? AND seq=?",
                        (group_id, sender, contiguous + 1)).fetchone() is not None:
            contiguous += 1
    c.execute("INSERT OR REPLACE INTO envelope_senders VALUES (?,?,?,?,?,?)",
              (group_id, sender, count + 1, max(top, seq), contiguous,
               (setsum + digest_term(digest)) & SETSUM_MASK))


def resummarize(c: sqlite3.Connection, group_id: bytes, sender: bytes, covered: int) -> None:
    """Rebuild a sender's ``envelope_senders`` row from what is stored (a migration), or after
    a compaction covered its seqs ``1..covered`` and deleted them but the state: what the point
    covers counts as held (the contiguous mark starts at ``covered``), and the count, top and
    sum are over the envelopes still held, the kept state envelope included. So two syncnodes
    that applied the same point and hold the same tail have the same summary, whatever each
    held below the point (a node that pulled the state after the compaction never had the
    covered envelopes), and the reconciler finds them in sync; and a node that lacks the state
    sees a peer's row that counts it, and pulls it (without the state in the count it never
    would)."""
    count, top, setsum, contiguous = 0, covered, 0, covered
    for seq, digest in c.execute("SELECT seq, digest FROM envelopes WHERE group_id=? AND "
                                 "sender=? ORDER BY seq", (group_id, sender)):
        count, top = count + 1, max(top, seq)
        setsum = (setsum + digest_term(digest)) & SETSUM_MASK
        if seq == contiguous + 1:
            contiguous = seq
    c.execute("INSERT OR REPLACE INTO envelope_senders VALUES (?,?,?,?,?,?)",
              (group_id, sender, count, top, contiguous, setsum))


def _migrate_summary(conn: sqlite3.Connection, to: int) -> None:
    """Version 1 or 2 to ``to``: (re)build ``envelope_senders`` from the envelopes already
    stored, one :func:`resummarize` per sender (covered 0 where no compaction was applied; a
    development build numbered its compaction tables 2, without the summary). The tables
    themselves come from ``SCHEMA`` (IF NOT EXISTS)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM envelope_senders")
        covered = {(g, s): q for g, s, q in conn.execute(
            "SELECT group_id, sender, seq FROM compacted").fetchall()}
        senders = conn.execute("SELECT group_id, sender FROM envelopes UNION "
                               "SELECT group_id, sender FROM compacted").fetchall()
        for group_id, sender in senders:
            resummarize(conn, group_id, sender, covered.get((group_id, sender), 0))
        conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(to),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def open_database(path: Path) -> sqlite3.Connection:
    """Create or open the database, check its schema version, return a read connection."""
    conn = connect(path)
    has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
                            ).fetchone() is not None
    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone() \
        if has_meta else None
    if row is not None and int(row[0]) not in (1, 2, SCHEMA_VERSION):
        # Refused before anything is written: a newer syncnode's database stays as it was.
        conn.close()
        raise RuntimeError(f"{path}: schema version {row[0]}, this syncnode needs "
                           f"{SCHEMA_VERSION}")
    conn.executescript(SCHEMA)
    _migrate_mailbox(conn)
    if row is None:
        conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) < SCHEMA_VERSION:  # 1: no summary; 2: summary (or a development build's
        _migrate_summary(conn, SCHEMA_VERSION)  # compaction tables without it): rebuild both
    _ensure_incarnation(conn)
    check = conn.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        raise RuntimeError(f"{path}: database integrity check failed: {check}")
    return conn


def _ensure_incarnation(conn: sqlite3.Connection) -> None:
    """Give the database its incarnation (:meth:`~syncnode.storage.Storage.incarnation`) if it
    has none: a new one, or one an older syncnode made (its statements named none). It lives
    in ``meta``, which every schema version has, so no version bump: an older syncnode simply
    ignores it. Autocommit with ``synchronous=FULL``: durable before any statement names it."""
    if conn.execute("SELECT 1 FROM meta WHERE key='incarnation'").fetchone() is None:
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('incarnation', ?)",
                     (entropy.token_bytes(INCARNATION_BYTES).hex(),))


def storage_bytes(path: Path) -> int:
    """Bytes the database occupies on disk (main file + WAL)."""
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


PULLING_SHOWN = 20
"""Groups still pulling their history that ``summary`` names (the rest are only counted)."""


def summary(path: Path) -> dict[str, int]:
    """Groups, envelopes and decisions held by the database at ``path``, and how the groups
    are hosted: ``catching_up`` (adopted, the log not yet at the slot that named this node),
    ``pulling`` (serving, envelope history incomplete), ``removed`` (read-only; works while
    a syncnode runs on it)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out = {
            "groups": conn.execute("SELECT count(*) FROM groups").fetchone()[0],
            "envelopes": conn.execute("SELECT count(*) FROM envelopes").fetchone()[0],
            "decisions": conn.execute("SELECT count(*) FROM decided WHERE slot>0").fetchone()[0],
            "catching_up": 0, "pulling": 0, "removed": 0,
        }
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name='hosting'").fetchone():
            out.update(zip(("catching_up", "pulling", "removed"), conn.execute(
                "SELECT coalesce(sum(removed_slot IS NULL AND NOT serving), 0), "
                "coalesce(sum(removed_slot IS NULL AND serving AND NOT history_complete), 0), "
                "coalesce(sum(removed_slot IS NOT NULL), 0) FROM hosting").fetchone(),
                strict=True))
        return out
    finally:
        conn.close()


def groups_in_progress(path: Path, limit: int = PULLING_SHOWN) -> list[str]:
    """Ids (hex) of up to ``limit`` groups not yet caught up: adopted and not serving, or
    serving with an incomplete history (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name='hosting'").fetchone():
            return []
        return [bytes(r[0]).hex() for r in conn.execute(
            "SELECT group_id FROM hosting WHERE removed_slot IS NULL AND NOT "
            "(serving AND history_complete) ORDER BY group_id LIMIT ?", (limit,))]
    finally:
        conn.close()
