"""Hearing what the other processes of this node committed: LISTEN on a dedicated connection.

Writes queue ``pg_notify`` payloads that PostgreSQL delivers when their transaction commits
(:mod:`~syncnode.storage.postgres_writer`). One connection per process LISTENs; psycopg's
``notifies()`` blocks, so it runs on its own thread, and each payload is handed to the trio
side with ``TrioToken.run_sync_soon`` (in commit order). If the connection drops, notifications
may have been missed: it reconnects and reports :data:`RESYNC`, and the receiver must then
treat everything it caches as stale.

A payload is ``origin kind group_hex key_hex number size`` (:func:`encode_change`); the origin
is a random token per process, so a process skips its own changes (it applied them already).
PostgreSQL limits a payload to 8000 bytes, so payloads name what changed, never carry it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import trio

from proto.logs import get_logger
from syncnode.storage.base import Change

log = get_logger("syncnode.storage")

RESYNC = Change("resync", b"", b"", 0, 0)
"""Reported after the listening connection was lost: notifications may have been missed."""


def encode_change(origin: str, change: Change) -> str:
    return (f"{origin} {change.kind} {change.group_id.hex()} {change.key.hex()} "
            f"{change.number} {change.size}")


def decode_change(payload: str) -> tuple[str, Change] | None:
    try:
        origin, kind, group, key, number, size = payload.split(" ")
        return origin, Change(kind, bytes.fromhex(group), bytes.fromhex(key), int(number),
                              int(size))
    except ValueError:
        return None  # not ours (someone else NOTIFYing on the channel): ignored


class Listener:
    """LISTENs on ``channel`` and calls ``deliver(change)`` on the trio thread for every change
    another process committed (and :data:`RESYNC` after a reconnection)."""

    def __init__(self, connect: Callable[[], psycopg.Connection], channel: str, origin: str,
                 deliver: Callable[[Change], None]) -> None:
        self.connect = connect
        self.channel = channel
        self.origin = origin
        self.deliver = deliver
        self._stop = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        token = trio.lowlevel.current_trio_token()
        conn = await trio.to_thread.run_sync(self._listen)
        task_status.started()
        try:
            # Abandoned on cancel: the thread sees _stop within a poll interval and closes.
            await trio.to_thread.run_sync(self._loop, conn, token, abandon_on_cancel=True)
        finally:
            self._stop = True

    def _listen(self) -> psycopg.Connection:
        conn = self.connect()
        conn.execute(f'LISTEN "{self.channel}"')  # type: ignore[arg-type]  # an identifier
        return conn

    def _loop(self, conn: psycopg.Connection, token: trio.lowlevel.TrioToken) -> None:
        try:
            while not self._stop:
                try:
                    for n in conn.notifies(timeout=0.5):
                        got = decode_change(n.payload)
                        if got is not None and got[0] != self.origin:
                            token.run_sync_soon(self._deliver, got[1])
                except psycopg.OperationalError as exc:
                    if self._stop:
                        return  # closing: the server may be going away with us
                    log.warning("notification connection lost; reconnecting", error=str(exc))
                    conn.close()
                    conn = self._reconnect()
                    if conn is None:
                        return
                    token.run_sync_soon(self._deliver, RESYNC)
        except trio.RunFinishedError:
            pass
        finally:
            conn.close()

    def _deliver(self, change: Change) -> None:
        if not self._stop:
            self.deliver(change)

    def _reconnect(self) -> psycopg.Connection | None:
        while not self._stop:
            try:
                return self._listen()
            except psycopg.OperationalError:
                time.sleep(1.0)
        return None
