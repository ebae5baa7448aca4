"""Fetching a member's snapshot peer to peer (protocol in :mod:`proto.p2p`; the serving side is
:mod:`device.p2p`).

Connect to a member, check that the peer's endpoint id is that member's in the manifest, verify
the offer's signature with the member's MLS key, receive the chunks, check the hash. Any failure
raises :class:`TransferError`; nothing is loaded until the whole snapshot verified. Apart from
the server so that engine modules (a reader's state fetch, :mod:`device.reader_state`) can use
it without importing the document facade the server needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from proto.codec import decode, encode
from proto.errors import DecodeError, SyncnodeError, TransportError
from proto.identity import fingerprint, short_id
from proto.manifest import Manifest
from proto.messages import ErrorReply
from proto.p2p import (
    MAX_SNAPSHOT,
    SnapshotBody,
    SnapshotChunk,
    SnapshotOffer,
    SnapshotRequest,
    snapshot_digest,
)
from proto.transport.base import Stream, Transport

STALL_TIMEOUT = 15.0


class TransferError(SyncnodeError):
    """The state transfer from one peer failed (unreachable, not a member, stalled, bad data)."""


@dataclass
class Progress:
    """Bytes of the snapshot received so far, out of ``total``."""

    done: int
    total: int


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
    return await fetch_signed_by(transport, endpoint_id, addrs, manifest.group_id,
                                 member.sig_pub, progress=progress, partial=partial,
                                 timeout=timeout, offer_timeout=timeout)


async def fetch_signed_by(transport: Transport, endpoint_id: bytes, addrs: tuple[str, ...],
                          group_id: bytes, sig_pub: bytes, *,
                          progress: Callable[[Progress], None] | None = None,
                          partial: dict[bytes, bytearray] | None = None,
                          timeout: float = STALL_TIMEOUT, offer_timeout: float = STALL_TIMEOUT
                          ) -> tuple[bytes, SnapshotBody]:
    """Fetch document ``group_id`` from the device at ``endpoint_id`` whose MLS signature key is
    ``sig_pub`` (a member, or the inviter a ticket names before the joiner can read the
    manifest). ``offer_timeout`` bounds the wait for the offer (a device answers a joiner only
    once it has added it); ``timeout`` every other step."""
    partial = partial if partial is not None else {}
    try:
        conn = await transport.connect(endpoint_id, list(addrs), timeout=timeout)
    except TransportError as exc:
        raise TransferError(f"cannot reach {short_id(endpoint_id)}: {exc}") from None
    try:
        stream = await conn.open_stream()
        return await _receive(stream, group_id, sig_pub, progress, partial, timeout,
                              offer_timeout)
    except (TransportError, DecodeError) as exc:
        raise TransferError(f"transfer from {short_id(endpoint_id)} failed: {exc}") from None
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()


async def _receive(stream: Stream, group_id: bytes, sig_pub: bytes,
                   progress: Callable[[Progress], None] | None,
                   partial: dict[bytes, bytearray], timeout: float, offer_timeout: float
                   ) -> tuple[bytes, SnapshotBody]:
    resume = next(iter(partial), None)
    offset = len(partial[resume]) if resume is not None else 0
    await stream.send(encode(SnapshotRequest(group_id, resume, offset)))
    try:
        with trio.fail_after(offer_timeout):
            offer = decode(await stream.receive())
        if isinstance(offer, ErrorReply):
            raise TransferError(f"peer refused: {offer.code.name}: {offer.detail}")
        if not isinstance(offer, SnapshotOffer):
            raise TransferError(f"expected an offer, got {type(offer).__name__}")
        body = offer.body
        if body.group_id != group_id or offer.signer != fingerprint(sig_pub) \
                or not offer.verify(sig_pub):
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
