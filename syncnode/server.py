"""Serving connections: streams of framed requests in, replies (in request order) out.

Each stream is read by one task that decodes requests and starts one handler task per request
(so writes from one pipelining client land in the same group-commit batch); a second task sends
the replies strictly in request order. Garbage, an oversized frame, or a non-request message
disconnects the whole connection: a well-behaved client never sends them, and a broken one must
not keep resources. Rate-limited requests get ``RATE_LIMITED`` and are not processed.

Every connection is a stranger until it authenticates, and even then it may be hostile, so each
one runs inside a budget (SECURITY.md lists the defaults; ``[limits]`` in ``syncnode.toml``):

* frames are at most ``max_frame_unauthenticated`` bytes until the connection has proved a key,
  refused from the length header alone; ``max_frame`` after that;
* at most ``max_connections`` connections, ``max_connections_per_endpoint`` from one endpoint,
  ``max_streams_per_connection`` streams each, ``max_requests_in_flight`` requests each, and
  only two of the requests that answer with whole pages (backfill, decided log, mailbox) at once;
* a client that does not read its replies stops being read once ``max_reply_bytes_queued`` of
  them wait (so a slow reader costs the node that much, not its whole backlog);
* a connection with no request and no subscription for ``idle_timeout`` seconds is closed;
* frames over :data:`INLINE_DECODE` bytes are decoded on a worker thread, so one large frame does
  not hold every other client up (the decoder's own bound is in :mod:`proto.codec`).

Each refusal is counted in ``syncnode_refused{reason=...}``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from proto.antientropy import FetchMarks
from proto.codec import decode, encode
from proto.errors import DecodeError, FrameError, StreamClosed, TransportError
from proto.holdings import FetchHoldings
from proto.identity import short_id
from proto.logs import get_logger
from proto.messages import ErrorCode, ErrorReply
from proto.service import (
    Authenticate,
    Authenticated,
    Backfill,
    FetchDecided,
    MailboxFetch,
    Subscribe,
)
from proto.transport.base import Connection, Stream
from syncnode.budgets import TokenBucket
from syncnode.config import Limits
from syncnode.service import Service
from syncnode.session import RequestError, Session

log = get_logger("syncnode.server")

PIPELINE_DEPTH = 256
"""Requests of one stream in flight at once; the reader waits when the replies lag behind."""
MAX_COALESCE = 64
INLINE_DECODE = 1024 * 1024
"""Frames up to this size are decoded on the event loop; larger ones on a worker thread."""
PAGE_REQUESTS = (Backfill, FetchDecided, MailboxFetch, FetchHoldings, FetchMarks)
"""Requests whose answers are pages of up to several MiB, or that read a whole group's
envelope index (``FetchHoldings``): two at a time per connection."""
PAGES_AT_ONCE = 2


class ProtocolViolation(Exception):
    """The peer sent something no correct client sends; the connection is dropped."""


class _Budget:
    """What one connection may hold of the node: requests in flight, page-sized answers being
    built, reply bytes waiting for the client to read them, streams, and when it last asked."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.in_flight = trio.CapacityLimiter(max(1, limits.max_requests_in_flight))
        self.pages = trio.CapacityLimiter(PAGES_AT_ONCE)
        self.queued = 0
        self._room = trio.Event()
        self._room.set()
        self.streams: set[Stream] = set()
        self.subscriptions = 0
        self.last_active = trio.current_time()
        self.authenticated = False

    def frame_limit(self) -> int:
        return (self.limits.max_frame if self.authenticated
                else min(self.limits.max_frame, self.limits.max_frame_unauthenticated))

    def add_queued(self, n: int) -> None:
        self.queued += n
        if self.queued > self.limits.max_reply_bytes_queued and self._room.is_set():
            self._room = trio.Event()

    def sent(self, n: int) -> None:
        self.queued -= n
        if self.queued <= self.limits.max_reply_bytes_queued:
            self._room.set()

    def full(self) -> bool:
        return not self._room.is_set()

    async def room(self) -> None:
        """Wait until the client has read enough of its replies."""
        await self._room.wait()


class Server:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.connections: set[Connection] = set()
        self.per_endpoint: Counter[bytes] = Counter()
        self.decode_limiter = trio.CapacityLimiter(1)
        self.threads = service.threads
        self.requests = frozenset((*service._handlers, Subscribe))
        """The only message types a client may send: anything else is refused from its tag,
        before its body is read (a stranger cannot make the node decode a large reply type)."""

    def _admit(self, conn: Connection) -> str | None:
        limits = self.service.limits
        if len(self.connections) >= limits.max_connections:
            return "too_many_connections"
        if self.per_endpoint[conn.remote_id] >= limits.max_connections_per_endpoint:
            return "too_many_connections_per_endpoint"
        return None

    async def handle_connection(self, conn: Connection) -> None:
        svc = self.service
        limits = svc.limits
        peer = short_id(conn.remote_id)
        refused = self._admit(conn)
        if refused is not None:
            svc.metrics.refuse(refused)
            log.warning("connection refused", peer=peer, reason=refused.replace("_", " "))
            with trio.CancelScope(shield=True):
                await conn.aclose()
            return
        session = Session(conn.remote_id, TokenBucket(limits.requests_per_second,
                                                      limits.request_burst))
        budget = _Budget(limits)
        svc.metrics.connections.inc()
        svc.metrics.connections_open.inc()
        self.connections.add(conn)
        self.per_endpoint[conn.remote_id] += 1
        log.info("connection opened", peer=peer, agent=conn.remote_agent,
                 version=conn.protocol_version)
        reason = ["closed by peer"]
        try:
            async with trio.open_nursery() as nursery:
                def violated(why: str) -> None:
                    reason[0] = f"protocol violation: {why}"
                    svc.metrics.disconnects.inc()
                    nursery.cancel_scope.cancel()

                def idle() -> None:
                    reason[0] = f"idle for {limits.idle_timeout:g} s"
                    svc.metrics.refuse("idle")
                    nursery.cancel_scope.cancel()

                nursery.start_soon(self._watch_idle, budget, idle)
                while True:
                    try:
                        stream = await conn.accept_stream()
                    except TransportError:
                        break
                    budget.last_active = trio.current_time()
                    if len(budget.streams) >= limits.max_streams_per_connection:
                        svc.metrics.refuse("too_many_streams")
                        nursery.start_soon(stream.aclose)
                        continue
                    stream.limit_receive(budget.frame_limit())
                    budget.streams.add(stream)
                    nursery.start_soon(self._stream, session, budget, stream, violated)
                nursery.cancel_scope.cancel()
        finally:
            self.connections.discard(conn)
            self.per_endpoint[conn.remote_id] -= 1
            if self.per_endpoint[conn.remote_id] <= 0:
                del self.per_endpoint[conn.remote_id]
            svc.metrics.connections_open.dec()
            with trio.CancelScope(shield=True):
                await conn.aclose()
            log.info("connection closed", peer=peer, reason=reason[0])

    async def _watch_idle(self, budget: _Budget, idle: Callable[[], None]) -> None:
        timeout = budget.limits.idle_timeout
        if timeout <= 0:
            return
        while True:
            await trio.sleep_until(budget.last_active + timeout)
            busy = budget.subscriptions or budget.in_flight.borrowed_tokens or budget.queued
            if busy:
                budget.last_active = trio.current_time()
            elif trio.current_time() >= budget.last_active + timeout:
                idle()
                return

    async def _stream(self, session: Session, budget: _Budget, stream: Stream,
                      violated: Callable[[str], None]) -> None:
        send, receive = trio.open_memory_channel[Any](PIPELINE_DEPTH)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._replies, budget, stream, receive)
                async with send:
                    await self._requests(session, budget, stream, send, nursery)
        except* ProtocolViolation as group:
            violated(str(group.exceptions[0]))
        except* (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; nothing to answer
        finally:
            budget.streams.discard(stream)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _requests(self, session: Session, budget: _Budget, stream: Stream,
                        send: trio.MemorySendChannel[Any], nursery: trio.Nursery) -> None:
        svc = self.service
        while True:
            if budget.full():
                svc.metrics.refuse("slow_reader")  # counted once per pause, not per byte
                await budget.room()
            try:
                frame = await stream.receive()
            except StreamClosed:
                return
            except FrameError as exc:  # oversized (from its header) or truncated frame
                svc.metrics.refuse("frame_too_large" if "exceeds" in str(exc)
                                   else "truncated_frame")
                raise ProtocolViolation(str(exc)) from None
            budget.last_active = trio.current_time()
            svc.metrics.bytes_in.inc(len(frame))
            try:
                msg = await self._decode(frame, budget.frame_limit())
            except DecodeError as exc:
                svc.metrics.refuse("undecodable")
                await self._send_error(stream, ErrorCode.MALFORMED, str(exc))
                raise ProtocolViolation(f"undecodable request: {exc}") from None
            if not session.bucket.take():
                svc.metrics.rate_limited.inc()
                svc.metrics.refuse("rate_limited")
                await send.send(_ready(budget, ErrorReply(ErrorCode.RATE_LIMITED,
                                                          "too many requests; slow down")))
                continue
            if isinstance(msg, Subscribe):  # the stream becomes a feed (send it on a new one)
                await send.aclose()
                await self._subscription(session, budget, stream, msg)
                return
            slot = _Slot()
            await budget.in_flight.acquire_on_behalf_of(slot)
            await send.send(slot)
            nursery.start_soon(self._answer, session, budget, msg, slot)

    async def _decode(self, frame: bytes, limit: int) -> Any:
        if self.threads and len(frame) > INLINE_DECODE:
            return await trio.to_thread.run_sync(
                partial(decode, frame, max_bytes=limit, only=self.requests),
                limiter=self.decode_limiter)
        return decode(frame, max_bytes=limit, only=self.requests)

    async def _answer(self, session: Session, budget: _Budget, msg: Any, slot: _Slot) -> None:
        try:
            if isinstance(msg, PAGE_REQUESTS):
                async with budget.pages:
                    reply = await self.service.handle(session, msg)
            else:
                reply = await self.service.handle(session, msg)
            if isinstance(msg, Authenticate) and isinstance(reply, Authenticated):
                self._authenticated(budget)
        except Exception as exc:  # a bug: answer INTERNAL, keep serving, leave a trace
            log.exception("request failed", request=type(msg).__name__)
            reply = ErrorReply(ErrorCode.INTERNAL, f"internal error ({type(exc).__name__})")
        finally:
            budget.in_flight.release_on_behalf_of(slot)
        slot.frame = encode(reply)
        budget.add_queued(len(slot.frame))
        slot.done.set()

    @staticmethod
    def _authenticated(budget: _Budget) -> None:
        """The connection proved a key: its streams may carry full-size frames from now on."""
        if not budget.authenticated:
            budget.authenticated = True
            for stream in budget.streams:
                stream.limit_receive(budget.frame_limit())

    async def _replies(self, budget: _Budget, stream: Stream,
                       receive: trio.MemoryReceiveChannel[Any]) -> None:
        # Replies that are ready together leave in one write (one transport call instead of
        # one per reply), which is most of the time under load: a batch commit wakes many. A
        # reply never waits for a later, slower one.
        pending: deque[_Slot] = deque()
        async with receive:
            while True:
                if not pending:
                    try:
                        pending.append(await receive.receive())
                    except trio.EndOfChannel:
                        return
                while len(pending) < MAX_COALESCE:
                    try:
                        pending.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await pending[0].done.wait()
                frames = []
                while pending and pending[0].done.is_set():
                    frames.append(pending.popleft().frame)
                size = sum(len(f) for f in frames)
                self.service.metrics.bytes_out.inc(size)
                try:
                    await stream.send_many(frames)
                finally:
                    budget.sent(size)

    async def _subscription(self, session: Session, budget: _Budget, stream: Stream,
                            msg: Subscribe) -> None:
        svc = self.service
        try:
            subscribed, sub = await svc.subscribe(session, msg)
        except RequestError as exc:
            await stream.send(encode(exc.reply()))
            return
        log.info("subscribed", peer=short_id(session.remote_id), group=short_id(msg.group_id))
        budget.subscriptions += 1
        try:
            await stream.send(encode(subscribed))
            async with trio.open_nursery() as nursery:
                async def watch_close() -> None:
                    # The subscriber sends nothing more; any frame or EOF ends the feed.
                    try:
                        await stream.receive()
                    except (TransportError, DecodeError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_close)
                async for frame in sub.receive:
                    sub.taken(len(frame))
                    svc.metrics.bytes_out.inc(len(frame))
                    await stream.send(frame)
                if sub.closed_reason:
                    await self._send_error(stream, ErrorCode.UNAUTHORIZED
                                           if "removed" in sub.closed_reason
                                           else ErrorCode.RATE_LIMITED, sub.closed_reason)
                nursery.cancel_scope.cancel()
        finally:
            budget.subscriptions -= 1
            budget.last_active = trio.current_time()
            svc.unsubscribe(sub)

    @staticmethod
    async def _send_error(stream: Stream, code: ErrorCode, detail: str) -> None:
        try:
            await stream.send(encode(ErrorReply(code, detail[:1024])))
        except TransportError:
            pass


class _Slot:
    __slots__ = ("done", "frame")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.frame = b""


def _ready(budget: _Budget, reply: Any) -> _Slot:
    slot = _Slot()
    slot.frame = encode(reply)
    budget.add_queued(len(slot.frame))
    slot.done.set()
    return slot
