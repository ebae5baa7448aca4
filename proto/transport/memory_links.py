"""The links of the in-memory network: per-frame faults, partitions, delivery and the trace.

:class:`MemoryLinks` carries every frame the memory endpoints (:mod:`proto.transport.memory`)
send. The harness controls it: per-frame **drop**, **duplicate**, **delay**, **reorder** and
**corrupt** faults, and **partitions** (symmetric or one-way link cuts) with heals. It knows
nothing of endpoints, connections or streams beyond the :class:`Lane` each direction of a
stream sends down, which is what lets the fault model be read, and changed, on its own.

Determinism: every random choice comes from a per-stream RNG derived from the network seed and
the stream's identity ``(src, dst, connection number, stream number)``, and deliveries due at the
same instant are ordered by that identity, never by task scheduling. Time is trio's clock, so
under ``trio.testing.MockClock(autojump_threshold=0)`` a run is reproducible from its seed; the
network records a trace of every frame event (:attr:`MemoryLinks.trace`) whose hash the tests
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio


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
DATA, EOF, CLOSE = "data", "eof", "close"


class MemoryLinks:
    """Every link between the memory endpoints of one run: faults, cuts, delivery, trace.

    :class:`proto.transport.memory.MemoryNetwork` adds the endpoints bound on it."""

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
        self.record("block", src, dst)

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
        self.record("heal", b"", b"")

    def is_blocked(self, src: bytes, dst: bytes) -> bool:
        return (src, dst) in self._blocked

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

    # -- used by the endpoints ----------------------------------------------------------------

    def record(self, event: str, src: bytes, dst: bytes, *detail: object) -> None:
        """Append one event to :attr:`trace` (endpoints record connects, closes and breaks)."""
        self.trace.append((round(trio.current_time(), 9), event, src.hex()[:8], dst.hex()[:8],
                           *detail))

    def rng_for(self, key: tuple[object, ...]) -> random.Random:
        """The RNG of the lane ``key``: its choices depend on the seed and its identity only."""
        digest = hashlib.blake2b(repr((self.seed, key)).encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "big"))

    def transmit(self, lane: Lane, kind: str, payload: bytes,
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
        if kind != DATA:
            # Control items (EOF, close) are never lost; they arrive after everything sent
            # before them on this lane, like a FIN.
            at = max(now + faults.min_delay, lane.last_at)
            lane.last_at = at
            self.record(kind, src, dst, ident)
            self._schedule(at, ident, lambda: self._arrive(lane, kind, payload, deliver, ident))
            return
        if (src, dst) in self._blocked:
            self.record("cut", src, dst, ident, digest)
            self._path_failed(lane, faults)
            return
        if rng.random() < faults.drop:
            self.record("drop", src, dst, ident, digest)
            if faults.ordered and lane.break_path is not None:
                self._schedule(now + faults.min_delay, ident, lane.break_path)
            return
        if faults.corrupt and payload and rng.random() < faults.corrupt:
            at = rng.randrange(len(payload))
            payload = payload[:at] + bytes([payload[at] ^ (1 << rng.randrange(8))]) + \
                payload[at + 1:]
            self.record("corrupt", src, dst, ident, at)
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
            self.record("send" if copy == 0 else "dup", src, dst, ident, digest, round(at, 9))
            self._schedule(at, (*ident, copy),
                           lambda: self._arrive(lane, kind, payload, deliver, ident))

    # -- internals ----------------------------------------------------------------------------

    def _schedule(self, at: float, order: tuple[object, ...], deliver: Callable[[], None]) -> None:
        if not self._started:
            raise RuntimeError("MemoryNetwork.run() must be running in a nursery")
        heapq.heappush(self._queue, (at, order, next(self._tiebreak), deliver))
        self._wakeup.set()

    def _path_failed(self, lane: Lane, faults: Faults) -> None:
        """With QUIC-like streams a frame cannot vanish: the connection dies instead, once the
        sender's retransmissions give up (PATH_TIMEOUT later)."""
        if faults.ordered and lane.break_path is not None:
            self._schedule(trio.current_time() + PATH_TIMEOUT, (lane.key, "path"),
                           lane.break_path)

    def _transmit_ordered(self, lane: Lane, faults: Faults, payload: bytes,
                          deliver: Callable[[bytes], None], ident: tuple[object, ...],
                          digest: object, then_break: bool) -> None:
        now = trio.current_time()
        rng = lane.rng
        at = now + rng.uniform(faults.min_delay, faults.max_delay)
        if rng.random() < faults.reorder:
            at += faults.reorder_delay  # this stream stalls; others overtake it
        at = max(at, lane.fifo_at)
        lane.fifo_at = lane.last_at = at
        self.record("send", lane.src, lane.dst, ident, digest, round(at, 9))
        self._schedule(at, (*ident, 0), lambda: self._arrive(lane, DATA, payload, deliver, ident))
        if then_break and lane.break_path is not None:
            self.record("dup-break", lane.src, lane.dst, ident)
            self._schedule(at, (*ident, 1), lane.break_path)

    def _arrive(self, lane: Lane, kind: str, payload: bytes, deliver: Callable[[bytes], None],
                ident: tuple[object, ...]) -> None:
        if kind == DATA and (lane.src, lane.dst) in self._blocked:
            self.record("cut-in-flight", lane.src, lane.dst, ident)
            self._path_failed(lane, self.faults_for(lane.src, lane.dst))
            return
        self.record("deliver", lane.src, lane.dst, ident, kind)
        deliver(payload)


class Lane:
    """One direction of one stream (or of a connection's control channel).

    ``break_path`` is what a QUIC-like fault calls to kill the connection the lane belongs to
    (both ends); a control lane has none, since closing is never lost."""

    def __init__(self, net: MemoryLinks, src: bytes, dst: bytes, key: tuple[object, ...],
                 break_path: Callable[[], None] | None = None) -> None:
        self.src, self.dst, self.key = src, dst, key
        self.break_path = break_path
        self.rng = net.rng_for(key)
        self.sent = 0
        self.last_at = 0.0  # latest scheduled arrival (EOF/close go after it)
        self.fifo_at = 0.0  # arrival time of the last in-order frame
