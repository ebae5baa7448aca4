"""Peer-to-peer initial state transfer between member devices (protocol in :mod:`proto.p2p`).

Serving side (every device): a connection from an endpoint id that belongs to a member of the
requested document gets a signed offer and the snapshot in chunks. The snapshot and the vector
it covers are taken in one synchronous step, so they always match. The last snapshot served per
document is kept for a few minutes so an interrupted transfer can resume at an offset.

The fetching side (a device that just joined, or a reader filling a gap) is
:mod:`device.p2p_fetch`, re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from device.document import Document
from device.p2p_fetch import STALL_TIMEOUT, Progress, TransferError, fetch_snapshot
from proto.codec import decode, encode
from proto.errors import DecodeError, TransportError
from proto.identity import SecretKey, short_id
from proto.logs import get_logger
from proto.messages import ErrorCode, ErrorReply
from proto.p2p import (
    CHUNK,
    SnapshotBody,
    SnapshotChunk,
    SnapshotOffer,
    SnapshotRequest,
)
from proto.transport.base import Connection, Stream

__all__ = ["PeerServer", "Peers", "Progress", "TransferError", "fetch_snapshot"]

log = get_logger("device.p2p")

CACHE_SECONDS = 300.0
MEMBER_WAIT = 5.0


@dataclass
class _Served:
    data: bytes
    body: SnapshotBody
    at: float


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
