"""Serving connections: streams of framed requests in, replies (in request order) out.

Each stream is read by one task that decodes requests and starts one handler task per request
(so writes from one pipelining client land in the same group-commit batch); a second task sends
the replies strictly in request order. Garbage, an oversized frame, or a non-request message
disconnects the whole connection: a well-behaved client never sends them, and a broken one must
not keep resources. Rate-limited requests get ``RATE_LIMITED`` and are not processed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from proto.codec import decode, encode
from proto.errors import DecodeError, StreamClosed, TransportError
from proto.identity import short_id
from proto.logs import get_logger
from proto.messages import ErrorCode, ErrorReply
from proto.service import Subscribe
from proto.transport.base import Connection, Stream
from syncnode.service import RequestError, Service, Session, TokenBucket

log = get_logger("syncnode.server")

PIPELINE_DEPTH = 256
"""Requests of one stream in flight at once; the reader waits when the replies lag behind."""
MAX_COALESCE = 64


class ProtocolViolation(Exception):
    """The peer sent something no correct client sends; the connection is dropped."""


class Server:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.connections: set[Connection] = set()

    async def handle_connection(self, conn: Connection) -> None:
        svc = self.service
        limits = svc.limits
        session = Session(conn.remote_id, TokenBucket(limits.requests_per_second,
                                                      limits.request_burst))
        peer = short_id(conn.remote_id)
        svc.metrics.connections.inc()
        svc.metrics.connections_open.inc()
        self.connections.add(conn)
        log.info("connection opened", peer=peer, agent=conn.remote_agent,
                 version=conn.protocol_version)
        reason = ["closed by peer"]
        try:
            async with trio.open_nursery() as nursery:
                def violated(why: str) -> None:
                    reason[0] = f"protocol violation: {why}"
                    svc.metrics.disconnects.inc()
                    nursery.cancel_scope.cancel()

                while True:
                    try:
                        stream = await conn.accept_stream()
                    except TransportError:
                        break
                    nursery.start_soon(self._stream, session, stream, violated)
        finally:
            self.connections.discard(conn)
            svc.metrics.connections_open.dec()
            with trio.CancelScope(shield=True):
                await conn.aclose()
            log.info("connection closed", peer=peer, reason=reason[0])

    async def _stream(self, session: Session, stream: Stream,
                      violated: Callable[[str], None]) -> None:
        send, receive = trio.open_memory_channel[Any](PIPELINE_DEPTH)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._replies, stream, receive)
                async with send:
                    await self._requests(session, stream, send, nursery)
        except* ProtocolViolation as group:
            violated(str(group.exceptions[0]))
        except* (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; nothing to answer
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _requests(self, session: Session, stream: Stream,
                        send: trio.MemorySendChannel[Any], nursery: trio.Nursery) -> None:
        svc = self.service
        while True:
            try:
                frame = await stream.receive()
            except StreamClosed:
                return
            except DecodeError as exc:  # oversized or truncated frame
                raise ProtocolViolation(str(exc)) from None
            svc.metrics.bytes_in.inc(len(frame))
            try:
                msg = decode(frame, max_bytes=svc.limits.max_frame)
            except DecodeError as exc:
                await self._send_error(stream, ErrorCode.MALFORMED, str(exc))
                raise ProtocolViolation(f"undecodable request: {exc}") from None
            if not session.bucket.take():
                svc.metrics.rate_limited.inc()
                await send.send(_ready(ErrorReply(ErrorCode.RATE_LIMITED,
                                                  "too many requests; slow down")))
                continue
            if isinstance(msg, Subscribe):  # the stream becomes a feed (send it on a new one)
                await send.aclose()
                await self._subscription(session, stream, msg)
                return
            slot = _Slot()
            await send.send(slot)
            nursery.start_soon(self._answer, session, msg, slot)

    async def _answer(self, session: Session, msg: Any, slot: _Slot) -> None:
        try:
            slot.reply = await self.service.handle(session, msg)
        except Exception as exc:  # a bug: answer INTERNAL, keep serving, leave a trace
            log.exception("request failed", request=type(msg).__name__)
            slot.reply = ErrorReply(ErrorCode.INTERNAL, f"internal error ({type(exc).__name__})")
        finally:
            slot.done.set()

    async def _replies(self, stream: Stream, receive: trio.MemoryReceiveChannel[Any]) -> None:
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
                    frames.append(encode(pending.popleft().reply))
                self.service.metrics.bytes_out.inc(sum(len(f) for f in frames))
                await stream.send_many(frames)

    async def _subscription(self, session: Session, stream: Stream, msg: Subscribe) -> None:
        svc = self.service
        try:
            subscribed, sub = svc.subscribe(session, msg)
        except RequestError as exc:
            await stream.send(encode(exc.reply()))
            return
        log.info("subscribed", peer=short_id(session.remote_id), group=short_id(msg.group_id))
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
                    svc.metrics.bytes_out.inc(len(frame))
                    await stream.send(frame)
                if sub.closed_reason:
                    await self._send_error(stream, ErrorCode.UNAUTHORIZED
                                           if "removed" in sub.closed_reason
                                           else ErrorCode.RATE_LIMITED, sub.closed_reason)
                nursery.cancel_scope.cancel()
        finally:
            svc.unsubscribe(sub)

    @staticmethod
    async def _send_error(stream: Stream, code: ErrorCode, detail: str) -> None:
        try:
            await stream.send(encode(ErrorReply(code, detail[:1024])))
        except TransportError:
            pass


class _Slot:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Any = None


def _ready(reply: Any) -> _Slot:
    slot = _Slot()
    slot.reply = reply
    slot.done.set()
    return slot
