"""What an authenticated connection and its streams offer, whichever transport carries them.

A connection multiplexes bidirectional streams; a stream carries **frames** (byte strings,
length-prefixed on real wires). The peer id of a connection is authenticated by the transport
(TLS in iroh; by construction in memory), so protocol code can trust ``Connection.remote_id``.

These interfaces have a module of their own, below both :mod:`proto.transport.handshake` (which
speaks over a connection) and :mod:`proto.transport.base` (whose ``Transport`` runs the handshake
inside ``connect``/``accept``), so that neither of those imports the other's importer.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence


class Stream(abc.ABC):
    """A bidirectional, ordered (on real networks) stream of frames."""

    @abc.abstractmethod
    async def send(self, frame: bytes) -> None:
        """Send one frame. Raises :class:`proto.errors.TransportError` if the stream broke."""

    async def send_many(self, frames: Sequence[bytes]) -> None:
        """Send several frames; transports that can, do it in one write (much faster)."""
        for frame in frames:
            await self.send(frame)

    @abc.abstractmethod
    async def receive(self) -> bytes:
        """The next frame. Raises :class:`proto.errors.StreamClosed` at a clean end of stream.

        Cancelling a ``receive`` loses nothing: the stream stays usable and a later call
        returns the next frame.
        """

    def limit_receive(self, max_frame: int) -> None:
        """Refuse received frames over ``max_frame`` bytes (at most the transport's own limit),
        from the length header alone: a server keeps a stranger's frames small until it has
        authenticated, then lifts the limit. Raises nothing; a later oversized frame makes
        :meth:`receive` raise :class:`proto.errors.FrameError`."""
        raise NotImplementedError

    @abc.abstractmethod
    async def send_eof(self) -> None:
        """Finish our sending half; the peer's ``receive`` raises StreamClosed after the data."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Abandon both halves of the stream."""


class Connection(abc.ABC):
    """An authenticated connection to one peer."""

    remote_id: bytes
    protocol_version: int = 0
    remote_agent: str = ""

    @abc.abstractmethod
    async def open_stream(self) -> Stream: ...

    @abc.abstractmethod
    async def accept_stream(self) -> Stream:
        """The next stream the peer opened. Raises TransportError when the connection ends."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...
