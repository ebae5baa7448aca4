"""Client side of the syncnode service: pipelined requests over one stream, and subscriptions.

Used by devices and by syncnodes fetching decisions from their peers. Replies come back in
request order (the server guarantees it), so a channel matches them to callers with a FIFO and
many requests can be in flight on one stream; that is what lets a busy client fill the server's
group-commit batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from proto.address import Addresses, AddressRecord, GetAddresses, PutAddress
from proto.antientropy import Digests, FetchDigests, FetchMarks, Marks
from proto.codec import decode, encode, encode_struct
from proto.envelope import Envelope
from proto.errors import SyncnodeError, TransportError
from proto.groups import single_errors
from proto.holdings import FetchHoldings, Holdings, SignedHeads
from proto.identity import SecretKey
from proto.manifest import LogValue
from proto.messages import ErrorCode, ErrorReply
from proto.paxos.messages import Decided
from proto.service import (
    AUTH_CTX,
    AdoptGroup,
    AuthBody,
    Authenticate,
    Authenticated,
    Backfill,
    BackfillPage,
    Challenge,
    DecidedPage,
    Done,
    FetchDecided,
    FetchGroupStatus,
    FetchHeads,
    GetChallenge,
    GroupRegistered,
    GroupStatus,
    Heads,
    MailboxAck,
    MailboxFetch,
    MailboxItems,
    MailboxKind,
    MailboxNotice,
    MailboxPut,
    MailboxStored,
    RegisterGroup,
    Stored,
    Subscribe,
    Subscribed,
    Watermark,
)
from proto.ticket import NodeTicket
from proto.transport.base import Connection, Stream, Transport

T = TypeVar("T")


class RemoteError(SyncnodeError):
    """The syncnode answered with a typed error."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code
        self.detail = detail


class UnexpectedReply(SyncnodeError):
    """The syncnode answered with a message of the wrong type."""


class _Waiter:
    __slots__ = ("done", "error", "reply", "sent_at")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Any = None
        self.error: BaseException | None = None
        self.sent_at = trio.current_time()


class Channel:
    """Pipelined request/response on one stream. Start :meth:`run` in a nursery."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._waiters: deque[_Waiter] = deque()
        self._lock = trio.Lock()
        self._broken: BaseException | None = None
        self._last_reply = trio.current_time()

    def stalled_for(self) -> float:
        """Seconds this channel has been waiting for a reply without receiving any (0 while no
        request is outstanding). Replies come in request order, so this measures the peer's
        progress, not one request's age: a busy peer answering a long pipeline is not stalled,
        a dead, frozen or restarted one is (its stale connection never answers)."""
        if not self._waiters:
            return 0.0
        return trio.current_time() - max(self._last_reply, self._waiters[0].sent_at)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        try:
            while True:
                frame = await self.stream.receive()
                self._last_reply = trio.current_time()
                if not self._waiters:
                    raise UnexpectedReply("reply without a request")
                w = self._waiters.popleft()
                try:
                    w.reply = decode(frame)
                except SyncnodeError as exc:
                    w.error = exc
                w.done.set()
        except (TransportError, UnexpectedReply) as exc:
            self._fail(exc)
        finally:
            self._fail(TransportError("channel closed"))

    def _fail(self, exc: BaseException) -> None:
        self._broken = self._broken or exc
        while self._waiters:
            w = self._waiters.popleft()
            w.error = exc
            w.done.set()

    async def call(self, msg: Any) -> Any:
        if self._broken is not None:
            raise TransportError(f"channel is broken: {self._broken}")
        w = _Waiter()
        async with self._lock:
            self._waiters.append(w)
            try:
                await self.stream.send(encode(msg))
            except BaseException as exc:
                # Interrupted (cancelled) or failed half way: the frame may be partly written
                # and this waiter has no request behind it, so every later reply would go to
                # the wrong caller. The stream is out of step for good: break the channel.
                self._fail(exc if isinstance(exc, TransportError)
                           else TransportError("a request was interrupted while being sent"))
                raise
        await w.done.wait()
        if w.error is not None:
            raise w.error
        return w.reply


def expect(reply: Any, cls: type[T]) -> T:
    if isinstance(reply, ErrorReply):
        raise RemoteError(reply.code, reply.detail)
    if not isinstance(reply, cls):
        raise UnexpectedReply(f"expected {cls.__name__}, got {type(reply).__name__}")
    return reply


class SyncnodeClient:
    """A connection to one syncnode. Use :meth:`connect` (an async context manager)."""

    def __init__(self, conn: Connection, channel: Channel, nursery: trio.Nursery,
                 local_id: bytes) -> None:
        self.conn = conn
        self.local_id = local_id
        self.channel = channel
        self._nursery = nursery

    @property
    def node_id(self) -> bytes:
        return self.conn.remote_id

    @classmethod
    @asynccontextmanager
    async def connect(cls, transport: Transport, ticket: NodeTicket, *,
                      timeout: float | None = None) -> AsyncIterator[SyncnodeClient]:
        conn = await transport.connect(ticket.node_id, ticket.addrs, timeout=timeout)
        try:
            with single_errors():
                async with trio.open_nursery() as nursery:
                    channel = Channel(await conn.open_stream())
                    await nursery.start(channel.run)
                    yield cls(conn, channel, nursery, transport.node_id)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def call(self, msg: Any, cls: type[T]) -> T:
        return expect(await self.channel.call(msg), cls)

    async def request(self, msg: Any) -> Any:
        """Send any request, return whatever came back (ErrorReply included)."""
        return await self.channel.call(msg)

    async def authenticate(self, key: SecretKey) -> bytes:
        """Prove we hold ``key`` (a device's MLS signature key); returns its fingerprint."""
        challenge = await self.call(GetChallenge(), Challenge)
        body = AuthBody(self.node_id, self.local_id, challenge.nonce)
        sig = key.sign(AUTH_CTX, encode_struct(body))
        return (await self.call(Authenticate(key.public, sig), Authenticated)).fingerprint

    async def register_group(self, genesis: LogValue) -> GroupRegistered:
        return await self.call(RegisterGroup(genesis.encode()), GroupRegistered)

    async def adopt_group(self, genesis: LogValue, named: Decided) -> GroupRegistered:
        """Ask this syncnode to host a group whose decided slot ``named`` first names it; it
        then fetches the group's history from the other syncnodes (:meth:`group_status`)."""
        return await self.call(AdoptGroup(genesis.encode(), named), GroupRegistered)

    async def group_status(self, group_id: bytes) -> GroupStatus:
        return await self.call(FetchGroupStatus(group_id), GroupStatus)

    async def learn(self, decided: Decided) -> int:
        return (await self.call(decided, Done)).count

    async def fetch_decided(self, group_id: bytes, from_slot: int, limit: int = 256
                            ) -> DecidedPage:
        return await self.call(FetchDecided(group_id, from_slot, limit), DecidedPage)

    async def heads(self, group_ids: Sequence[bytes]) -> Heads:
        return await self.call(FetchHeads(tuple(group_ids)), Heads)

    async def holdings(self, group_id: bytes, senders: Sequence[bytes],
                       probes: Sequence[tuple[bytes, int]] = ()) -> SignedHeads:
        """The syncnode's signed heads of a group (:mod:`proto.holdings`); verify them."""
        msg = FetchHoldings(group_id, tuple(senders), tuple(Watermark(s, q) for s, q in probes))
        return (await self.call(msg, Holdings)).heads

    async def store(self, envelope: Envelope) -> Stored:
        return await self.call(envelope, Stored)

    async def backfill(self, group_id: bytes, watermarks: dict[bytes, int], limit: int = 256
                       ) -> BackfillPage:
        return await self.call(Backfill(group_id, watermarks_of(watermarks), limit),
                               BackfillPage)

    async def digests(self, group_ids: Sequence[bytes]) -> Digests:
        """Digests of the groups' envelopes (syncnode to syncnode, :mod:`proto.antientropy`)."""
        return await self.call(FetchDigests(tuple(group_ids)), Digests)

    async def marks(self, group_id: bytes) -> Marks:
        return await self.call(FetchMarks(group_id), Marks)

    @asynccontextmanager
    async def subscribe(self, group_id: bytes) -> AsyncIterator[Subscription]:
        """A live feed of new envelopes and decisions of a group, on its own stream."""
        stream = await self.conn.open_stream()
        try:
            await stream.send(encode(Subscribe(group_id)))
            head = expect(decode(await stream.receive()), Subscribed)
            yield Subscription(stream, head.top)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def get_addresses(self, node_ids: Sequence[bytes]) -> list[AddressRecord]:
        """Signed address records the syncnode holds for ``node_ids`` (verify them)."""
        return list((await self.call(GetAddresses(tuple(node_ids)), Addresses)).records)

    async def put_address(self, record: AddressRecord) -> bool:
        return bool((await self.call(PutAddress(record), Done)).count)

    async def mailbox_put(self, recipient: bytes, kind: MailboxKind, payload: bytes,
                          ttl: int, *, group_id: bytes | None = None,
                          proof: bytes | None = None) -> int:
        """``group_id``: the group we put as a member of; ``proof``: a join request's
        :func:`proto.service.put_proof` (see :class:`MailboxPut`)."""
        return (await self.call(MailboxPut(recipient, kind, payload, ttl, group_id, proof),
                                MailboxStored)).item_id

    async def mailbox_fetch(self, recipient: bytes, after: int = 0, limit: int = 64
                            ) -> MailboxItems:
        return await self.call(MailboxFetch(recipient, after, limit), MailboxItems)

    async def mailbox_ack(self, recipient: bytes, item_ids: Sequence[int]) -> int:
        return (await self.call(MailboxAck(recipient, tuple(item_ids)), Done)).count


def watermarks_of(marks: dict[bytes, int]) -> tuple[Watermark, ...]:
    """A ``Backfill``'s watermarks as sent (the syncnode signs them back, see
    :class:`proto.holdings.SignedBackfill`)."""
    return tuple(Watermark(s, q) for s, q in sorted(marks.items()))


class Subscription:
    """Frames pushed by the syncnode: :class:`Envelope`, :class:`Decided`, and
    :class:`MailboxNotice` (an item arrived for a key this connection authenticated with)."""

    def __init__(self, stream: Stream, top: int) -> None:
        self.stream = stream
        self.top = top

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Envelope | Decided | MailboxNotice:
        try:
            frame = await self.stream.receive()
        except TransportError:
            raise StopAsyncIteration from None
        msg = decode(frame)
        if isinstance(msg, ErrorReply):
            raise RemoteError(msg.code, msg.detail)
        if not isinstance(msg, Envelope | Decided | MailboxNotice):
            raise UnexpectedReply(f"unexpected {type(msg).__name__} on a subscription")
        return msg
