"""In-memory transport for tests and the deterministic simulator.

A :class:`MemoryNetwork` connects any number of :class:`MemoryTransport` endpoints in one trio
run. The harness controls the network: per-frame **drop**, **duplicate**, **delay** and
**reorder** faults, and **partitions** (symmetric or one-way link cuts) with heals.

Determinism: every random choice comes from a per-stream RNG derived from the network seed and
the stream's identity ``(src, dst, connection number, stream number)``, and deliveries due at the
same instant are ordered by that identity, never by task scheduling. Time is trio's clock, so
under ``trio.testing.MockClock(autojump_threshold=0)`` a run is reproducible from its seed; the
network records a trace of every frame event (:attr:`MemoryNetwork.trace`) whose hash the tests
compare across runs.

By default a faulty memory stream is, unlike QUIC, not reliable or ordered: frames can be lost,
repeated or overtaken, exactly as the fault model asks. With ``Faults(ordered=True)`` streams
keep QUIC's guarantees and the faults take the shapes QUIC lets an application see: a lost
frame breaks the connection before it arrives (the request is lost), a duplicated one breaks it
right after (the reply is lost, so the client's retry reaches the server twice), and reordering
holds a stream back so frames of *other* streams and connections overtake it. The simulator
runs that way, since the protocol above relies on ordered streams. With faults off, streams are
reliable and ordered either way.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import trio

from proto.errors import FrameError, StreamClosed, TransportError
from proto.framing import DEFAULT_MAX_FRAME, encode_frame
from proto.transport.base import Connection, Stream, Transport
from proto.wakeup import Signal


@dataclass(frozen=True)
class Faults:
    """Per-frame fault probabilities and latency (seconds of trio time)."""

    drop: float = 0.0
    duplicate: float = 0.0
    min_delay: float = 0.0
    max_delay: float = 0.0
    reorder: float = 0.0
    """Probability that a frame is held back by an extra ``reorder_delay`` (overtaken)."""
    reorder_delay: float = 0.05
    ordered: bool = False
    """QUIC-like streams: loss and duplication surface as connection failures (see above)."""
    corrupt: float = 0.0
    """Probability that one byte of a frame is flipped in transit (a buggy or hostile sender;
    QUIC would catch line noise, not a peer that sends garbage on purpose)."""

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder", "corrupt"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} probability {p} not in [0, 1]")
        if not 0.0 <= self.min_delay <= self.max_delay:
            raise ValueError("need 0 <= min_delay <= max_delay")


NO_FAULTS = Faults()
PATH_TIMEOUT = 1.0
"""Seconds until a QUIC-like connection whose frames cannot get through is declared dead."""

# Kinds of items carried over a link.
_DATA, _EOF, _CLOSE = "data", "eof", "close"


class MemoryNetwork:
    """The simulated network joining all memory endpoints of one run."""

    def __init__(self, seed: int = 0, faults: Faults = NO_FAULTS, *,
                 payload_digests: bool = True) -> None:
        self.seed = seed
        self.faults = faults
        self.payload_digests = payload_digests
        """Trace a hash of each frame (else its length: for runs whose payloads hold bytes
        that are random even under a fixed seed, such as MLS ciphertexts)."""
        self._link_faults: dict[tuple[bytes, bytes], Faults] = {}
        self._node_faults: dict[bytes, Faults] = {}
        self._blocked: set[tuple[bytes, bytes]] = set()
        self._listeners: dict[bytes, MemoryTransport] = {}
        self._conn_counter: dict[tuple[bytes, bytes], itertools.count[int]] = {}
        self._queue: list[tuple[float, tuple[object, ...], int, Callable[[], None]]] = []
        self._tiebreak = itertools.count()
        self._wakeup = trio.Event()
        self.trace: list[tuple[object, ...]] = []
        self._started = False

    # -- harness controls ---------------------------------------------------------------------

    def set_link_faults(self, src: bytes, dst: bytes, faults: Faults) -> None:
        """Faults for one direction of one link (overrides the network default)."""
        self._link_faults[(src, dst)] = faults

    def set_node_faults(self, src: bytes, faults: Faults | None) -> None:
        """Faults for everything ``src`` sends (below per-link faults); None removes them."""
        if faults is None:
            self._node_faults.pop(src, None)
        else:
            self._node_faults[src] = faults

    def faults_for(self, src: bytes, dst: bytes) -> Faults:
        return self._link_faults.get((src, dst)) or self._node_faults.get(src) or self.faults

    def block(self, src: bytes, dst: bytes) -> None:
        """Cut the one-way link ``src -> dst`` (asymmetric partition)."""
        self._blocked.add((src, dst))
        self._record("block", src, dst)

    def partition(self, *groups: Iterable[bytes]) -> None:
        """Split the given node groups from each other (both directions)."""
        sets = [set(g) for g in groups]
        for i, a in enumerate(sets):
            for b in sets[i + 1:]:
                for x in a:
                    for y in b:
                        self.block(x, y)
                        self.block(y, x)

    def heal(self) -> None:
        """Restore every link."""
        self._blocked.clear()
        self._record("heal", b"", b"")

    def is_blocked(self, src: bytes, dst: bytes) -> bool:
        return (src, dst) in self._blocked

    def endpoint(self, node_id: bytes, *, max_frame: int = DEFAULT_MAX_FRAME,
                 agent: str = "syncnode-mem") -> MemoryTransport:
        """Create and register the endpoint of ``node_id`` (its "bind")."""
        if node_id in self._listeners:
            raise TransportError(f"node {node_id.hex()[:10]} is already bound")
        t = MemoryTransport(self, node_id, max_frame)
        t.agent = agent
        self._listeners[node_id] = t
        return t

    def trace_digest(self) -> str:
        """Hash of the trace. Events of one instant are hashed in a canonical order: tasks that
        wake at the same virtual time may run in any order without changing the run."""
        h = hashlib.sha256()
        for event in sorted(self.trace, key=lambda e: (e[0], repr(e[1:]))):
            h.update(repr(event).encode())
        return h.hexdigest()

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The delivery pump; start it in a nursery before using any endpoint."""
        self._started = True
        task_status.started()
        while True:
            now = trio.current_time()
            while self._queue and self._queue[0][0] <= now:
                _, _, _, deliver = heapq.heappop(self._queue)
                deliver()
            self._wakeup = trio.Event()
            if self._queue:
                with trio.move_on_at(self._queue[0][0]):
                    await self._wakeup.wait()
            else:
                await self._wakeup.wait()

    # -- internals ----------------------------------------------------------------------------

    def _record(self, event: str, src: bytes, dst: bytes, *detail: object) -> None:
        self.trace.append((round(trio.current_time(), 9), event, src.hex()[:8], dst.hex()[:8],
                           *detail))

    def _rng(self, key: tuple[object, ...]) -> random.Random:
        digest = hashlib.blake2b(repr((self.seed, key)).encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "big"))

    def _next_conn_no(self, src: bytes, dst: bytes) -> int:
        return next(self._conn_counter.setdefault((src, dst), itertools.count()))

    def _schedule(self, at: float, order: tuple[object, ...], deliver: Callable[[], None]) -> None:
        if not self._started:
            raise RuntimeError("MemoryNetwork.run() must be running in a nursery")
        heapq.heappush(self._queue, (at, order, next(self._tiebreak), deliver))
        self._wakeup.set()

    def _transmit(self, lane: _Lane, kind: str, payload: bytes,
                  deliver: Callable[[bytes], None]) -> None:
        """Send one item down ``lane`` applying the link's faults."""
        src, dst = lane.src, lane.dst
        faults = self.faults_for(src, dst)
        rng = lane.rng
        seq = lane.sent
        lane.sent += 1
        now = trio.current_time()
        digest: object = (hashlib.blake2b(payload, digest_size=6).hexdigest()
                          if self.payload_digests else len(payload))
        ident = (lane.key, seq)
        if kind != _DATA:
            # Control items (EOF, close) are never lost; they arrive after everything sent
            # before them on this lane, like a FIN.
            at = max(now + faults.min_delay, lane.last_at)
            lane.last_at = at
            self._record(kind, src, dst, ident)
            self._schedule(at, ident, lambda: self._arrive(lane, kind, payload, deliver, ident))
            return
        if (src, dst) in self._blocked:
            self._record("cut", src, dst, ident, digest)
            self._path_failed(lane, faults)
            return
        if rng.random() < faults.drop:
            self._record("drop", src, dst, ident, digest)
            if faults.ordered and lane.conn is not None:
                conn = lane.conn
                self._schedule(now + faults.min_delay, ident, conn._fail_both)
            return
        if faults.corrupt and payload and rng.random() < faults.corrupt:
            at = rng.randrange(len(payload))
            payload = payload[:at] + bytes([payload[at] ^ (1 << rng.randrange(8))]) + \
                payload[at + 1:]
            self._record("corrupt", src, dst, ident, at)
        copies = 2 if rng.random() < faults.duplicate else 1
        if faults.ordered:
            self._transmit_ordered(lane, faults, payload, deliver, ident, digest, copies > 1)
            return
        for copy in range(copies):
            # Jitter alone keeps the lane FIFO (like a QUIC stream); only the reorder fault
            # lets later frames overtake this one.
            at = max(now + rng.uniform(faults.min_delay, faults.max_delay), lane.fifo_at)
            if rng.random() < faults.reorder:
                at += faults.reorder_delay
            elif copy == 0:
                lane.fifo_at = at
            lane.last_at = max(lane.last_at, at)
            self._record("send" if copy == 0 else "dup", src, dst, ident, digest, round(at, 9))
            self._schedule(at, (*ident, copy),
                           lambda: self._arrive(lane, kind, payload, deliver, ident))

    def _path_failed(self, lane: _Lane, faults: Faults) -> None:
        """With QUIC-like streams a frame cannot vanish: the connection dies instead, once the
        sender's retransmissions give up (PATH_TIMEOUT later)."""
        if faults.ordered and lane.conn is not None:
            self._schedule(trio.current_time() + PATH_TIMEOUT, (lane.key, "path"),
                           lane.conn._fail_both)

    def _transmit_ordered(self, lane: _Lane, faults: Faults, payload: bytes,
                          deliver: Callable[[bytes], None], ident: tuple[object, ...],
                          digest: object, then_break: bool) -> None:
        now = trio.current_time()
        rng = lane.rng
        at = now + rng.uniform(faults.min_delay, faults.max_delay)
        if rng.random() < faults.reorder:
            at += faults.reorder_delay  # this stream stalls; others overtake it
        at = max(at, lane.fifo_at)
        lane.fifo_at = lane.last_at = at
        self._record("send", lane.src, lane.dst, ident, digest, round(at, 9))
        self._schedule(at, (*ident, 0), lambda: self._arrive(lane, _DATA, payload, deliver, ident))
        if then_break and lane.conn is not None:
            conn = lane.conn
            self._record("dup-break", lane.src, lane.dst, ident)
            self._schedule(at, (*ident, 1), conn._fail_both)

    def _arrive(self, lane: _Lane, kind: str, payload: bytes, deliver: Callable[[bytes], None],
                ident: tuple[object, ...]) -> None:
        if kind == _DATA and (lane.src, lane.dst) in self._blocked:
            self._record("cut-in-flight", lane.src, lane.dst, ident)
            self._path_failed(lane, self.faults_for(lane.src, lane.dst))
            return
        self._record("deliver", lane.src, lane.dst, ident, kind)
        deliver(payload)


class _Lane:
    """One direction of one stream (or of a connection's control channel)."""

    def __init__(self, net: MemoryNetwork, src: bytes, dst: bytes, key: tuple[object, ...],
                 conn: MemoryConnection | None = None) -> None:
        self.src, self.dst, self.key = src, dst, key
        self.conn = conn
        self.rng = net._rng(key)
        self.sent = 0
        self.last_at = 0.0  # latest scheduled arrival (EOF/close go after it)
        self.fifo_at = 0.0  # arrival time of the last in-order frame


class MemoryStream(Stream):
    def __init__(self, conn: MemoryConnection, key: tuple[bool, int]) -> None:
        self._conn = conn
        self.key = key  # (opened by this side?, stream number within the opener's numbering)
        opener = conn.local_id if key[0] else conn.remote_id
        lane_key = ("s", conn.local_id.hex()[:16], opener.hex()[:16], conn.conn_key, key[1])
        self._out = _Lane(conn.net, conn.local_id, conn.remote_id, lane_key, conn)
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
        self._conn._send_on(self, _DATA, bytes(frame))

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
        self._conn._send_on(self, _EOF, b"")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self._eof_out and not self._conn.broken and not self._closed:
            self._eof_out = True
            self._conn._send_on(self, _EOF, b"")
        self._closed = True
        self._wake()

    # called by the network
    def _deliver(self, kind: str, payload: bytes) -> None:
        if kind == _DATA:
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
        self._control = _Lane(net, self.local_id, remote_id, ("c", *conn_key, opener))

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
            self.net._transmit(self._control, _CLOSE, b"", lambda _p: peer._break())
        self.local._connections.pop(self, None)

    def _fail_both(self) -> None:
        """The path failed: both ends see the connection die (a QUIC idle timeout)."""
        self.net._record("break", self.local_id, self.remote_id, self.conn_key)
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
        self.net._transmit(stream._out, kind, payload,
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
            net._record("dial-unreachable", self.node_id, peer_id)
            await trio.sleep_forever()  # like a real dial: hangs until the caller's timeout
        no = net._next_conn_no(self.node_id, peer_id)
        key = (self.node_id.hex()[:16], peer_id.hex()[:16], no)
        mine = MemoryConnection(net, self, peer_id, key, opener=True)
        theirs = MemoryConnection(net, listener, self.node_id, key, opener=False)
        mine.peer, theirs.peer = theirs, mine
        try:
            listener._incoming_send.send_nowait(theirs)
        except (trio.WouldBlock, trio.ClosedResourceError):
            raise TransportError("peer is not accepting connections") from None
        net._record("connect", self.node_id, peer_id, no)
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
