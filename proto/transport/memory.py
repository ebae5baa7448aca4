"""In-memory transport for tests and the deterministic simulator.

A :class:`MemoryNetwork` connects any number of :class:`MemoryTransport` endpoints in one trio
run, with the same interface as the iroh transport (:mod:`proto.transport.base`): connections,
streams of frames, the version handshake. This module holds the endpoints, connections and
streams and how they map onto the network; what happens to a frame between two endpoints (the
seeded faults, partitions, delivery order and the trace) is :mod:`proto.transport.memory_links`,
whose docstring explains the fault model and what makes a run reproducible. ``Faults`` is
re-exported here, so a harness imports everything it needs from this module.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence

import trio

from proto.errors import FrameError, StreamClosed, TransportError
from proto.framing import DEFAULT_MAX_FRAME, encode_frame
from proto.transport.base import Transport
from proto.transport.connection import Connection, Stream
from proto.transport.memory_links import CLOSE, DATA, EOF, NO_FAULTS, Faults, Lane, MemoryLinks
from proto.wakeup import Signal

__all__ = ["Faults", "MemoryConnection", "MemoryNetwork", "MemoryStream", "MemoryTransport"]


class MemoryNetwork(MemoryLinks):
    """The simulated network joining all memory endpoints of one run: the links (faults,
    partitions, the delivery pump, the trace) and the endpoints bound on them."""

    def __init__(self, seed: int = 0, faults: Faults = NO_FAULTS, *,
                 payload_digests: bool = True) -> None:
        super().__init__(seed, faults, payload_digests=payload_digests)
        self._listeners: dict[bytes, MemoryTransport] = {}
        self._conn_counter: dict[tuple[bytes, bytes], itertools.count[int]] = {}

    def endpoint(self, node_id: bytes, *, max_frame: int = DEFAULT_MAX_FRAME,
                 agent: str = "syncnode-mem") -> MemoryTransport:
        """Create and register the endpoint of ``node_id`` (its "bind")."""
        if node_id in self._listeners:
            raise TransportError(f"node {node_id.hex()[:10]} is already bound")
        t = MemoryTransport(self, node_id, max_frame)
        t.agent = agent
        self._listeners[node_id] = t
        return t

    def next_conn_no(self, src: bytes, dst: bytes) -> int:
        """The number of the next connection ``src`` dials to ``dst``: counted per pair, it is
        part of the lanes' keys, so their RNGs do not depend on traffic between other nodes."""
        return next(self._conn_counter.setdefault((src, dst), itertools.count()))


class MemoryStream(Stream):
    def __init__(self, conn: MemoryConnection, key: tuple[bool, int]) -> None:
        self._conn = conn
        self.key = key  # (opened by this side?, stream number within the opener's numbering)
        opener = conn.local_id if key[0] else conn.remote_id
        lane_key = ("s", conn.local_id.hex()[:16], opener.hex()[:16], conn.conn_key, key[1])
        self._out = Lane(conn.net, conn.local_id, conn.remote_id, lane_key, conn._fail_both)
        self._inbox: deque[bytes] = deque()
        self._eof_in = False
        self._eof_out = False
        self._closed = False
        self._changed = Signal()
        self._announced = False  # has the peer side seen this stream yet?
        self._receive_limit = conn.max_frame

    def limit_receive(self, max_frame: int) -> None:
        self._receive_limit = max(1, min(max_frame, self._conn.max_frame))

    def _wake(self) -> None:
        self._changed.fire()

    async def send(self, frame: bytes) -> None:
        await trio.lowlevel.checkpoint()
        encode_frame(frame, self._conn.max_frame)  # same size check as a real wire
        self._check_sendable()
        self._conn._send_on(self, DATA, bytes(frame))

    def _check_sendable(self) -> None:
        if self._conn.broken:
            raise TransportError("connection closed")
        if self._eof_out or self._closed:
            raise TransportError("stream already finished")

    async def receive(self) -> bytes:
        while True:
            if self._inbox:
                await trio.lowlevel.checkpoint()
                frame = self._inbox.popleft()
                if len(frame) > self._receive_limit:  # as a real wire's header check
                    raise FrameError("<frame>", f"frame of {len(frame)} bytes exceeds max "
                                     f"{self._receive_limit}")
                return frame
            if self._eof_in or self._closed:
                await trio.lowlevel.checkpoint()
                raise StreamClosed("peer finished the stream")
            if self._conn.broken:
                await trio.lowlevel.checkpoint()
                raise TransportError("connection closed")
            await self._changed.wait()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self._check_sendable()
        self._eof_out = True
        self._conn._send_on(self, EOF, b"")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self._eof_out and not self._conn.broken and not self._closed:
            self._eof_out = True
            self._conn._send_on(self, EOF, b"")
        self._closed = True
        self._wake()

    # called by the network
    def _deliver(self, kind: str, payload: bytes) -> None:
        if kind == DATA:
            self._inbox.append(payload)
        else:
            self._eof_in = True
        self._wake()


class MemoryConnection(Connection):
    def __init__(self, net: MemoryNetwork, local: MemoryTransport, remote_id: bytes,
                 conn_key: tuple[object, ...], opener: bool) -> None:
        self.net = net
        self.local = local
        self.local_id = local.node_id
        self.remote_id = remote_id
        self.conn_key = conn_key
        self.max_frame = local.max_frame
        self.peer: MemoryConnection | None = None
        self.broken = False
        self._streams: dict[tuple[bool, int], MemoryStream] = {}
        self._next_stream = 0
        send_accepted, self._accepted = trio.open_memory_channel[MemoryStream](1024)
        self._send_accepted = send_accepted
        self._control = Lane(net, self.local_id, remote_id, ("c", *conn_key, opener))

    async def open_stream(self) -> MemoryStream:
        await trio.lowlevel.checkpoint()
        if self.broken:
            raise TransportError("connection closed")
        no = self._next_stream
        self._next_stream += 1
        stream = MemoryStream(self, (True, no))
        self._streams[stream.key] = stream
        return stream

    async def accept_stream(self) -> MemoryStream:
        try:
            return await self._accepted.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportError("connection closed") from None

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._close_now()

    def _close_now(self) -> None:
        if self.broken:
            return
        self._break()
        if self.peer is not None:
            peer = self.peer
            self.net.transmit(self._control, CLOSE, b"", lambda _p: peer._break())
        self.local._connections.pop(self, None)

    def _fail_both(self) -> None:
        """The path failed: both ends see the connection die (a QUIC idle timeout)."""
        self.net.record("break", self.local_id, self.remote_id, self.conn_key)
        for end in (self, self.peer):
            if end is not None:
                end._break()
                end.local._connections.pop(end, None)

    def _break(self) -> None:
        if self.broken:
            return
        self.broken = True
        self._send_accepted.close()
        for s in self._streams.values():
            s._wake()

    def _send_on(self, stream: MemoryStream, kind: str, payload: bytes) -> None:
        peer = self.peer
        if peer is None:
            raise TransportError("connection not established")
        key = (not stream.key[0], stream.key[1])  # the same stream as seen from the peer
        self.net.transmit(stream._out, kind, payload,
                           lambda p: peer._stream_arrival(key, kind, p))

    def _stream_arrival(self, key: tuple[bool, int], kind: str, payload: bytes) -> None:
        if self.broken:
            return
        stream = self._streams.get(key)
        if stream is None:
            if key[0]:  # a frame for a stream we opened and forgot: ignore
                return
            stream = MemoryStream(self, key)
            self._streams[key] = stream
            try:
                self._send_accepted.send_nowait(stream)
            except trio.WouldBlock:
                return  # too many unaccepted streams: refuse, like a stream limit
        stream._deliver(kind, payload)


class MemoryTransport(Transport):
    """One node's endpoint on a :class:`MemoryNetwork`."""

    def __init__(self, net: MemoryNetwork, node_id: bytes, max_frame: int) -> None:
        self.net = net
        self.node_id = node_id
        self.max_frame = max_frame
        self._incoming_send, self._incoming = trio.open_memory_channel[MemoryConnection](1024)
        self._connections: dict[MemoryConnection, None] = {}  # ordered: closes replay alike
        self.closed = False

    def addresses(self) -> list[str]:
        return [f"mem:{self.node_id.hex()}"]

    async def _dial(self, peer_id: bytes, addresses: Sequence[str]) -> MemoryConnection:
        net = self.net
        if self.closed:
            raise TransportError("endpoint closed")
        await trio.sleep(net.faults_for(self.node_id, peer_id).min_delay)
        listener = net._listeners.get(peer_id)
        if (listener is None or listener.closed or net.is_blocked(self.node_id, peer_id)
                or net.is_blocked(peer_id, self.node_id)):
            net.record("dial-unreachable", self.node_id, peer_id)
            await trio.sleep_forever()  # like a real dial: hangs until the caller's timeout
        no = net.next_conn_no(self.node_id, peer_id)
        key = (self.node_id.hex()[:16], peer_id.hex()[:16], no)
        mine = MemoryConnection(net, self, peer_id, key, opener=True)
        theirs = MemoryConnection(net, listener, self.node_id, key, opener=False)
        mine.peer, theirs.peer = theirs, mine
        try:
            listener._incoming_send.send_nowait(theirs)
        except (trio.WouldBlock, trio.ClosedResourceError):
            raise TransportError("peer is not accepting connections") from None
        net.record("connect", self.node_id, peer_id, no)
        self._connections[mine] = None
        listener._connections[theirs] = None
        return mine

    async def _accept_raw(self) -> MemoryConnection:
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportError("endpoint closed") from None

    async def aclose(self) -> None:
        """Close the endpoint and all its connections (a crash, as seen from the network)."""
        if self.closed:
            return
        self.closed = True
        if self.net._listeners.get(self.node_id) is self:  # first: a crash may cancel the rest
            del self.net._listeners[self.node_id]
        self._incoming_send.close()
        for conn in list(self._connections):
            conn._close_now()  # synchronously: under cancellation nothing after a checkpoint runs
        await trio.lowlevel.checkpoint()
