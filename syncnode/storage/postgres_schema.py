"""PostgreSQL schema of a syncnode: versioned migrations applied at start, and the server-side
functions the hot writes use.

The tables mirror the SQLite schema (:mod:`~syncnode.storage.sqlite_schema`) with ``bytea`` for
blobs, plus what several processes of one node need: ``acceptor.record_hash`` (the Paxos
acceptor's compare-and-set, :meth:`PostgresStorage.put_acceptor_record_if`), and
``processes`` (the live processes of the node and their addresses, for its ticket).

**Migrations** are a list of ``(version, SQL)``; the database records the highest applied in
``meta.schema``. Every process applies what is missing at start, one at a time (a transaction-
scoped advisory lock), each in its own transaction, so a crash mid-migration leaves the previous
version. A database of a newer version than this syncnode knows is refused before anything is
written (an older binary must never run on a newer schema).

``store_envelope`` is one function call (:data:`STORE_ENVELOPE`): the idempotency and
compaction checks, the insert, the byte count and the per-sender summary (whose contiguous mark
walks over what is stored after it) run server-side, in one round trip instead of six.
"""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from proto import entropy
from proto.service import INCARNATION_BYTES

SCHEMA_VERSION = 1

V1 = r"""
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE groups (
    group_id bytea PRIMARY KEY, creator bytea NOT NULL, top_slot bigint NOT NULL,
    bytes_used bigint NOT NULL, created_at double precision NOT NULL);
CREATE INDEX groups_creator ON groups (creator);
CREATE TABLE manifests (group_id bytea NOT NULL, epoch bigint NOT NULL, manifest bytea NOT NULL,
    PRIMARY KEY (group_id, epoch));
CREATE TABLE decided (group_id bytea NOT NULL, slot bigint NOT NULL, value bytea NOT NULL,
    certificate bytea, PRIMARY KEY (group_id, slot));
CREATE TABLE acceptor (group_id bytea NOT NULL, slot bigint NOT NULL, record bytea NOT NULL,
    record_hash bytea NOT NULL, PRIMARY KEY (group_id, slot));
CREATE TABLE envelopes (group_id bytea NOT NULL, sender bytea NOT NULL, seq bigint NOT NULL,
    digest bytea NOT NULL, envelope bytea NOT NULL, PRIMARY KEY (group_id, sender, seq));
CREATE TABLE envelope_senders (group_id bytea NOT NULL, sender bytea NOT NULL,
    count bigint NOT NULL, top bigint NOT NULL, contiguous bigint NOT NULL,
    setsum bigint NOT NULL, PRIMARY KEY (group_id, sender));
CREATE TABLE mailbox (item_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recipient bytea NOT NULL, kind integer NOT NULL, payload bytea NOT NULL,
    expires_at bigint NOT NULL, sender bytea NOT NULL DEFAULT '\x'::bytea,
    size bigint NOT NULL DEFAULT 0);
CREATE INDEX mailbox_recipient ON mailbox (recipient, item_id);
CREATE INDEX mailbox_kind ON mailbox (kind, item_id);
CREATE INDEX mailbox_expiry ON mailbox (expires_at);
CREATE TABLE mailbox_usage (who bytea PRIMARY KEY, bytes bigint NOT NULL, items bigint NOT NULL);
CREATE TABLE address_records (node_id bytea PRIMARY KEY, issued_at bigint NOT NULL,
    record bytea NOT NULL);
CREATE TABLE hosting (group_id bytea PRIMARY KEY, named_slot bigint, adoption bytea,
    serving boolean NOT NULL, history_complete boolean NOT NULL, removed_slot bigint,
    removed_at double precision);
CREATE TABLE equivocations (group_id bytea NOT NULL, slot bigint NOT NULL, proof bytea NOT NULL,
    PRIMARY KEY (group_id, slot));
CREATE TABLE compactions (group_id bytea PRIMARY KEY, point bytea NOT NULL);
CREATE TABLE compacted (group_id bytea NOT NULL, sender bytea NOT NULL, seq bigint NOT NULL,
    PRIMARY KEY (group_id, sender));
CREATE TABLE processes (token text PRIMARY KEY, addrs text NOT NULL, pid integer NOT NULL,
    host text NOT NULL, seen_at double precision NOT NULL);

-- Live mailbox use per sender and per class (X'6a': join requests, X'6d': the rest), exact
-- whatever deletes an item, as the SQLite triggers keep it.
CREATE FUNCTION sn_mailbox_class(kind integer) RETURNS bytea LANGUAGE sql IMMUTABLE AS
    $$ SELECT CASE WHEN kind = 1 THEN '\x6a'::bytea ELSE '\x6d'::bytea END $$;
CREATE FUNCTION sn_mailbox_in() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mailbox_usage VALUES (NEW.sender, NEW.size, 1) ON CONFLICT (who)
        DO UPDATE SET bytes = mailbox_usage.bytes + excluded.bytes,
                      items = mailbox_usage.items + 1;
    INSERT INTO mailbox_usage VALUES (sn_mailbox_class(NEW.kind), NEW.size, 1)
        ON CONFLICT (who) DO UPDATE SET bytes = mailbox_usage.bytes + excluded.bytes,
                                        items = mailbox_usage.items + 1;
    RETURN NULL;
END $$;
CREATE FUNCTION sn_mailbox_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE mailbox_usage SET bytes = bytes - OLD.size, items = items - 1
        WHERE who IN (OLD.sender, sn_mailbox_class(OLD.kind));
    DELETE FROM mailbox_usage WHERE who = OLD.sender AND items <= 0;
    RETURN NULL;
END $$;
CREATE TRIGGER mailbox_usage_in AFTER INSERT ON mailbox FOR EACH ROW
    EXECUTE FUNCTION sn_mailbox_in();
CREATE TRIGGER mailbox_usage_out AFTER DELETE ON mailbox FOR EACH ROW
    EXECUTE FUNCTION sn_mailbox_out();

-- Transaction-scoped advisory locks, taken in ascending order at the start of every write
-- batch: two processes' batches never wait for each other's row locks in opposite orders.
CREATE FUNCTION sn_lock_all(keys bigint[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE k bigint;
BEGIN
    FOREACH k IN ARRAY (SELECT array_agg(x ORDER BY x) FROM unnest(keys) x) LOOP
        PERFORM pg_advisory_xact_lock(k);
    END LOOP;
END $$;
"""

STORE_ENVELOPE = r"""
-- 1: stored; 0: the same digest is held, or the key is covered by the compaction and not
-- held; -1: another digest is held (nothing written in either case but 1).
CREATE FUNCTION sn_store_envelope(g bytea, s bytea, q bigint, d bytea, e bytea, term bigint)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    prior bytea; covered bigint; c bigint; t bigint; cont bigint; total bigint;
BEGIN
    SELECT digest INTO prior FROM envelopes WHERE group_id = g AND sender = s AND seq = q;
    IF FOUND THEN
        RETURN CASE WHEN prior = d THEN 0 ELSE -1 END;
    END IF;
    SELECT seq INTO covered FROM compacted WHERE group_id = g AND sender = s;
    IF FOUND AND q <= covered THEN
        RETURN 0;
    END IF;
    INSERT INTO envelopes VALUES (g, s, q, d, e);
    UPDATE groups SET bytes_used = bytes_used + length(e) WHERE group_id = g;
    SELECT count, top, contiguous, setsum INTO c, t, cont, total FROM envelope_senders
        WHERE group_id = g AND sender = s;
    IF NOT FOUND THEN
        c := 0; t := 0; cont := 0; total := 0;
    END IF;
    IF q = cont + 1 THEN
        cont := q;
        WHILE EXISTS (SELECT 1 FROM envelopes WHERE group_id = g AND sender = s
                      AND seq = cont + 1) LOOP
            cont := cont + 1;
        END LOOP;
    END IF;
    INSERT INTO envelope_senders VALUES (g, s, c + 1, greatest(t, q), cont,
        ((total::numeric + term::numeric) % 9223372036854775808)::bigint)
        ON CONFLICT (group_id, sender) DO UPDATE SET count = excluded.count,
            top = excluded.top, contiguous = excluded.contiguous, setsum = excluded.setsum;
    RETURN 1;
END $$;
"""

MIGRATIONS: list[tuple[int, str]] = [(1, V1 + STORE_ENVELOPE)]
"""Every schema change, in order. Append a ``(version, SQL)``; never edit an applied one."""

MIGRATION_LOCK = 0x73796E636E6F6465  # "syncnode": one migrating process at a time


def lock_key(name: str) -> int:
    """The advisory lock key (a signed 64-bit int) of a lock name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big",
                          signed=True)


def migrate(conn: psycopg.Connection) -> int:
    """Bring the database to :data:`SCHEMA_VERSION` (RuntimeError if it is newer); returns the
    version found before. ``conn`` must be in autocommit mode."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        found = _version(conn)
        if found > SCHEMA_VERSION:
            raise RuntimeError(f"PostgreSQL database has schema version {found}, this syncnode "
                               f"needs {SCHEMA_VERSION}: upgrade syncnode")
        for version, sql in MIGRATIONS:
            if version <= found:
                continue
            with conn.transaction():
                conn.execute(sql)  # type: ignore[arg-type]  # migrations are constants
                conn.execute("INSERT INTO meta VALUES ('schema', %s) ON CONFLICT (key) DO "
                             "UPDATE SET value = excluded.value", (str(version),))
        conn.execute("INSERT INTO meta VALUES ('incarnation', %s) ON CONFLICT DO NOTHING",
                     (entropy.token_bytes(INCARNATION_BYTES).hex(),))
    return found


def describe(dsn: str) -> str:
    """Where ``dsn`` points, without its password (for messages)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(an unreadable PostgreSQL URL)"
    where = params.get("host") or "localhost"
    return f"database {params.get('dbname') or '(default)'} on {where}"


def preflight(dsn: str, node_id: bytes) -> None:
    """Before a process serves: reach the database, apply the missing migrations, and bind the
    database to ``node_id`` on first use. RuntimeError, one line, when any of it fails (an
    unreachable server, a newer schema, another node's database)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            migrate(conn)
            row = conn.execute("INSERT INTO meta VALUES ('node_id', %s) ON CONFLICT (key) DO "
                               "UPDATE SET value = meta.value RETURNING value",
                               (node_id.hex(),)).fetchone()
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(f"cannot use PostgreSQL ({describe(dsn)}): {first}") from None
    if row is None or row[0] != node_id.hex():
        owner = row[0][:16] if row else "?"
        raise RuntimeError(f"PostgreSQL {describe(dsn)} belongs to syncnode {owner}..., not "
                           f"{node_id.hex()[:16]}...: every process of one node runs with the "
                           "same node.key (copy it with `syncnode init --key`)")


def _version(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    got = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    return int(got[0]) if got else 0


def summary(dsn: str) -> dict[str, Any]:
    """Groups, envelopes and decisions held, and the live processes of the node with their
    addresses, as ``syncnode info`` shows them (read-only)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM groups), (SELECT count(*) FROM "
                           "envelopes), (SELECT count(*) FROM decided WHERE slot>0)").fetchone()
        live = conn.execute("SELECT addrs FROM processes WHERE seen_at >= "
                            "extract(epoch FROM now()) - 15 ORDER BY token").fetchall()
    groups, envelopes, decisions = row if row else (0, 0, 0)
    return {"groups": groups, "envelopes": envelopes, "decisions": decisions,
            "processes": len(live), "addrs": [a for (addrs,) in live for a in addrs.split()]}
