"""Peer-to-peer initial state transfer between member devices (protocol in :mod:`proto.p2p`).

Serving side (every device): a connection from an endpoint id that belongs to a member of the
requested document gets a signed offer and the snapshot in chunks. The snapshot and the vector
it covers are taken in one synchronous step, so they always match. The last snapshot served per
document is kept for a few minutes so an interrupted transfer can resume at an offset.

Fetching side (a device that just joined): connect to a member, check that the peer's endpoint id
is that member's in the manifest, verify the offer's signature with the member's MLS key, receive
the chunks, check the hash. Any failure raises :class:`TransferError`; nothing is loaded until
the whole snapshot verified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from device.document import Document
from proto.codec import decode, encode
from proto.errors import DecodeError, SyncnodeError, TransportError
from proto.identity import SecretKey, short_id
from proto.logs import get_logger
from proto.manifest import DeviceEntry, Manifest
from proto.messages import ErrorCode, ErrorReply
from proto.p2p import (
    CHUNK,
    MAX_SNAPSHOT,
    SnapshotBody,
    SnapshotChunk,
    SnapshotOffer,
    SnapshotRequest,
    snapshot_digest,
)
from proto.transport.base import Connection, Stream, Transport

log = get_logger("device.p2p")

CACHE_SECONDS = 300.0
STALL_TIMEOUT = 15.0
MEMBER_WAIT = 5.0


class TransferError(SyncnodeError):
    """The state transfer from one peer failed (unreachable, not a member, stalled, bad data)."""


@dataclass
class _Served:
    data: bytes
    body: SnapshotBody
    at: float


@dataclass
class Progress:
    """Bytes of the snapshot received so far, out of ``total``."""

    done: int
    total: int


class Peers(Protocol):
    """What the serving side needs from the device: its key and its documents."""

    key: SecretKey

    def document_for(self, group_id: bytes) -> Document | None: ...


class PeerServer:
    """Answers snapshot requests from other member devices."""

    def __init__(self, device: Peers) -> None:
        self.device = device
        self._cache: dict[bytes, _Served] = {}

    async def handle_connection(self, conn: Connection) -> None:
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        stream = await conn.accept_stream()
                    except TransportError:
                        return
                    nursery.start_soon(self._stream, conn.remote_id, stream)
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _stream(self, peer: bytes, stream: Stream) -> None:
        try:
            with trio.fail_after(STALL_TIMEOUT):
                req = decode(await stream.receive())
            if not isinstance(req, SnapshotRequest):
                await stream.send(encode(ErrorReply(ErrorCode.INVALID, "expected a request")))
                return
            await self._serve(peer, stream, req)
        except (TransportError, DecodeError, trio.TooSlowError) as exc:
            log.info("snapshot transfer ended", peer=short_id(peer), error=str(exc))
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve(self, peer: bytes, stream: Stream, req: SnapshotRequest) -> None:
        doc = self.device.document_for(req.group_id)
        if doc is None or doc.status != "active":
            await stream.send(encode(ErrorReply(ErrorCode.NOT_FOUND, "no such document here")))
            return
        # The requester was just added; we may not have learned that decision yet.
        with trio.move_on_after(MEMBER_WAIT):
            while not any(d.endpoint_id == peer for d in doc.manifest.devices):
                doc.replica.learn_wanted.fire()
                await doc.replica.epoch_changed.wait()
        if not any(d.endpoint_id == peer for d in doc.manifest.devices):
            await stream.send(encode(ErrorReply(ErrorCode.UNAUTHORIZED,
                                                "your endpoint is not a member's")))
            return
        served = self._cache.get(req.group_id)
        now = trio.current_time()
        if served is None or req.resume != served.body.digest or now - served.at > CACHE_SECONDS:
            data = doc.crdt.snapshot()  # taken together with the vector it covers
            body = doc.replica.snapshot_body(data)
            served = _Served(data, body, now)
            self._cache[req.group_id] = served
        offset = req.offset if req.resume == served.body.digest else 0
        offset = min(offset, len(served.data))
        await stream.send(encode(SnapshotOffer.sign(self.device.key, served.body, offset)))
        log.info("sending document state", doc=short_id(req.group_id), to=short_id(peer),
                 bytes=len(served.data) - offset, offset=offset)
        for start in range(offset, len(served.data), CHUNK):
            await stream.send(encode(SnapshotChunk(start, served.data[start:start + CHUNK])))
        await stream.send_eof()
        doc.invites.transfer_done(peer)


async def fetch_snapshot(transport: Transport, endpoint_id: bytes, addrs: tuple[str, ...],
                         manifest: Manifest, *, progress: Callable[[Progress], None] | None = None,
                         partial: dict[bytes, bytearray] | None = None,
                         timeout: float = STALL_TIMEOUT) -> tuple[bytes, SnapshotBody]:
    """Fetch the document of ``manifest`` from the member at ``endpoint_id``.

    ``partial`` maps a snapshot digest to the bytes received so far; pass the same dict again
    to resume after an interruption."""
    member = next((d for d in manifest.devices if d.endpoint_id == endpoint_id), None)
    if member is None:
        raise TransferError(f"{short_id(endpoint_id)} is not a member's endpoint")
    partial = partial if partial is not None else {}
    try:
        conn = await transport.connect(endpoint_id, list(addrs), timeout=timeout)
    except TransportError as exc:
        raise TransferError(f"cannot reach {short_id(endpoint_id)}: {exc}") from None
    try:
        stream = await conn.open_stream()
        return await _receive(stream, member, manifest, progress, partial, timeout)
    except (TransportError, DecodeError) as exc:
        raise TransferError(f"transfer from {short_id(endpoint_id)} failed: {exc}") from None
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()


async def _receive(stream: Stream, member: DeviceEntry, manifest: Manifest,
                   progress: Callable[[Progress], None] | None,
                   partial: dict[bytes, bytearray], timeout: float
                   ) -> tuple[bytes, SnapshotBody]:
    resume = next(iter(partial), None)
    offset = len(partial[resume]) if resume is not None else 0
    await stream.send(encode(SnapshotRequest(manifest.group_id, resume, offset)))
    try:
        with trio.fail_after(timeout):
            offer = decode(await stream.receive())
        if isinstance(offer, ErrorReply):
            raise TransferError(f"peer refused: {offer.code.name}: {offer.detail}")
        if not isinstance(offer, SnapshotOffer):
            raise TransferError(f"expected an offer, got {type(offer).__name__}")
        body = offer.body
        if body.group_id != manifest.group_id or offer.signer != member.fingerprint \
                or not offer.verify(member.sig_pub):
            raise TransferError("the snapshot offer is not signed by that member")
        if body.size > MAX_SNAPSHOT:
            raise TransferError(f"snapshot of {body.size} bytes is over the limit")
        buf = partial.get(body.digest) if offer.offset else None
        if buf is None or len(buf) != offer.offset:
            if offer.offset:
                raise TransferError("peer resumed at an offset we do not hold")
            buf = bytearray()
        partial.clear()
        partial[body.digest] = buf
        while len(buf) < body.size:
            with trio.fail_after(timeout):
                chunk = decode(await stream.receive())
            if not isinstance(chunk, SnapshotChunk) or chunk.offset != len(buf) \
                    or len(buf) + len(chunk.data) > body.size or not chunk.data:
                raise TransferError("malformed or out-of-order chunk")
            buf += chunk.data
            if progress is not None:
                progress(Progress(len(buf), body.size))
    except trio.TooSlowError:
        raise TransferError("peer stalled") from None
    data = bytes(buf)
    if snapshot_digest(data) != body.digest:
        partial.clear()
        raise TransferError("snapshot does not match its signed hash")
    partial.clear()
    return data, body
