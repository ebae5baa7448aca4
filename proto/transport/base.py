"""The transport interface shared by the iroh and in-memory implementations.

A transport gives a node an identity-authenticated endpoint: it can ``connect`` to a peer by its
node id (plus any known addresses) and ``accept`` connections; a connection multiplexes
bidirectional streams; a stream carries **frames** (byte strings, length-prefixed on real wires).
The peer id of a connection is authenticated by the transport (TLS in iroh; by construction in
memory), so protocol code can trust ``Connection.remote_id``. ``Stream`` and ``Connection`` are
declared in :mod:`proto.transport.connection` and re-exported here, so callers import the whole
interface from this module.

Both transports run the same version handshake (:mod:`proto.transport.handshake`) inside
``connect``/``accept``, so a returned connection always has an agreed ``protocol_version``.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence

import trio

from proto import SUPPORTED_VERSIONS
from proto.errors import ConnectTimeout, HandshakeError, PeerMismatch, TransportError
from proto.framing import DEFAULT_MAX_FRAME
from proto.transport.connection import Connection, Stream
from proto.transport.handshake import client_handshake, server_handshake

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_HANDSHAKE_TIMEOUT", "Connection", "Stream",
           "Transport"]

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class Transport(abc.ABC):
    """One node's endpoint. ``connect``/``accept`` include the version handshake."""

    node_id: bytes
    max_frame: int = DEFAULT_MAX_FRAME
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    agent: str = "syncnode"
    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    """Protocol versions this endpoint offers/accepts in the handshake."""

    @abc.abstractmethod
    def addresses(self) -> list[str]:
        """Addresses peers can dial us at (``host:port`` strings, or names in memory)."""

    @abc.abstractmethod
    async def _dial(self, peer_id: bytes, addresses: Sequence[str]) -> Connection:
        """Open a raw, authenticated connection (no handshake yet)."""

    @abc.abstractmethod
    async def _accept_raw(self) -> Connection:
        """The next incoming raw connection (no handshake yet)."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def connect(self, peer_id: bytes, addresses: Sequence[str] = (), *,
                      timeout: float | None = None) -> Connection:
        """Dial ``peer_id`` and run the handshake, all within ``timeout`` seconds."""
        deadline = self.connect_timeout if timeout is None else timeout
        try:
            with trio.fail_after(deadline):
                conn = await self._dial(peer_id, addresses)
                try:
                    if conn.remote_id != peer_id:
                        raise PeerMismatch(f"dialled {peer_id.hex()[:10]} but "
                                           f"{conn.remote_id.hex()[:10]} answered")
                    await client_handshake(conn, self.agent, self.versions)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
                    raise
                return conn
        except trio.TooSlowError:
            raise ConnectTimeout(
                f"connecting to {peer_id.hex()[:10]} at {list(addresses)} took over {deadline}s"
            ) from None

    async def _server_handshake(self, conn: Connection) -> bool:
        try:
            with trio.fail_after(self.handshake_timeout):
                await server_handshake(conn, self.agent, self.versions)
            return True
        except (HandshakeError, TransportError, trio.TooSlowError):
            with trio.CancelScope(shield=True):
                await conn.aclose()
            return False

    async def accept(self) -> Connection:
        """The next incoming connection that completed the handshake.

        Connections whose handshake fails are closed and skipped (they are the peer's problem,
        not the acceptor's): this only raises if the transport itself is closed. Handshakes run
        one at a time here; servers use :meth:`serve`, which runs them concurrently.
        """
        while True:
            conn = await self._accept_raw()
            if await self._server_handshake(conn):
                return conn

    async def serve(self, handler: Callable[[Connection], Awaitable[None]], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections forever, running handshake + ``handler`` per connection concurrently.

        A slow or silent dialler only occupies its own task. Returns when the transport is
        closed; the handler owns the connection and should close it when done.
        """
        async def one(conn: Connection) -> None:
            if await self._server_handshake(conn):
                await handler(conn)

        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    conn = await self._accept_raw()
                except TransportError:
                    nursery.cancel_scope.cancel()
                    return
                nursery.start_soon(one, conn)
