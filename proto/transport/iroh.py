"""The iroh transport: QUIC with endpoint-key authentication, driven natively from trio.

Importing this module patches the generated iroh binding (see :mod:`proto.transport.uniffi_trio`)
after checking that the private names it relies on exist.

Offline by default: relays are off unless a relay URL is configured, and the endpoint binds
exactly the addresses it is given (the ``minimal`` preset, no n0 discovery, DNS or pkarr).
Every dial is bounded by a timeout, because iroh keeps retrying an unreachable or wrong-key
address for ~30 s on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import iroh
import iroh.iroh_ffi
import trio

from proto.errors import StreamClosed, TransportError
from proto.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from proto.identity import SecretKey
from proto.transport.base import Transport
from proto.transport.connection import Connection, Stream
from proto.transport.uniffi_trio import patch_module

patch_module(iroh.iroh_ffi, async_api=True)

ALPN = b"syncnode/1"
READ_CHUNK = 256 * 1024
MAX_CONCURRENT_STREAMS = 256
CLOSE_WAIT = 0.5
"""Longest :meth:`IrohTransport.aclose` waits for the endpoint's connections to shut down."""


def _wrap(exc: BaseException, what: str) -> TransportError:
    if isinstance(exc, iroh.IrohError):
        try:
            detail = f"{exc.kind().name}: {exc.message()}"
        except Exception:  # pragma: no cover - defensive: the binding's accessors failed
            detail = repr(exc)
        return TransportError(f"{what}: {detail}")
    return TransportError(f"{what}: {exc!r}")


def _other_family(addr: str) -> str | None:
    """The loopback/wildcard of the other IP family matching ``addr``'s host, if any."""
    host = addr.rsplit(":", 1)[0]
    return {
        "127.0.0.1": "[::1]:0",
        "0.0.0.0": "[::]:0",
        "[::1]": "127.0.0.1:0",
        "[::]": "0.0.0.0:0",
    }.get(host)


class _ExactBind(iroh.Preset):
    """Minimal preset binding exactly the given sockets, with an optional relay list."""

    def __init__(self, bind_addrs: Sequence[str], relays: Sequence[str] | None) -> None:
        self._bind_addrs = list(bind_addrs)
        self._relays = list(relays) if relays else None

    def apply(self, builder: Any) -> None:
        builder.apply_minimal()
        if self._relays:
            builder.relay_mode(iroh.RelayMode.custom_from_urls(self._relays))
        else:
            builder.relay_mode(iroh.RelayMode.disabled())
        for addr in self._bind_addrs:
            builder.bind_addr(addr)


class IrohStream(Stream):
    """A framed view of one QUIC bi-stream. One reader at a time (iroh locks each half)."""

    def __init__(self, bi: Any, max_frame: int) -> None:
        self._bi = bi  # keep a reference: dropping a BiStream finishes it
        self._send = bi.send()
        self._recv = bi.recv()
        self._decoder = FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._eof = False

    def limit_receive(self, max_frame: int) -> None:
        self._decoder.max_frame = max(1, min(max_frame, self._max_frame))

    async def send(self, frame: bytes) -> None:
        data = encode_frame(frame, self._max_frame)
        try:
            await self._send.write_all(data)
        except iroh.IrohError as exc:
            raise _wrap(exc, "stream write failed") from None

    async def send_many(self, frames: Sequence[bytes]) -> None:
        """Send several frames in one write (much faster than one write per frame)."""
        data = b"".join(encode_frame(f, self._max_frame) for f in frames)
        try:
            await self._send.write_all(data)
        except iroh.IrohError as exc:
            raise _wrap(exc, "stream write failed") from None

    async def receive(self) -> bytes:
        # Each read either completes (and its bytes are buffered before the next checkpoint) or
        # is cancelled having consumed nothing, so cancellation never desynchronises framing.
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            if self._eof:
                self._decoder.check_eof()
                raise StreamClosed("peer finished the stream")
            try:
                data = await self._recv.read(READ_CHUNK)
            except iroh.IrohError as exc:
                raise _wrap(exc, "stream read failed") from None
            if not data:
                self._eof = True
            else:
                self._decoder.feed(data)

    async def send_eof(self) -> None:
        try:
            await self._send.finish()
        except iroh.IrohError as exc:
            raise _wrap(exc, "stream finish failed") from None

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for call in (self._send.finish, lambda: self._recv.stop(0)):
                try:
                    await call()
                except iroh.IrohError:
                    pass  # already finished / closed: nothing left to release


class IrohConnection(Connection):
    def __init__(self, conn: Any, max_frame: int) -> None:
        self._conn = conn
        self._max_frame = max_frame
        self.remote_id = bytes(conn.remote_id().to_bytes())
        conn.set_max_concurrent_bi_streams(MAX_CONCURRENT_STREAMS)

    async def open_stream(self) -> IrohStream:
        try:
            return IrohStream(await self._conn.open_bi(), self._max_frame)
        except iroh.IrohError as exc:
            raise _wrap(exc, "open stream failed") from None

    async def accept_stream(self) -> IrohStream:
        try:
            return IrohStream(await self._conn.accept_bi(), self._max_frame)
        except iroh.IrohError as exc:
            raise _wrap(exc, "connection ended") from None

    async def aclose(self) -> None:
        try:
            self._conn.close(0, b"closed")
        except iroh.IrohError:
            pass


class IrohTransport(Transport):
    """A bound iroh endpoint whose key is the node's (or device's) identity key."""

    def __init__(self, endpoint: Any, key: SecretKey, max_frame: int) -> None:
        self._ep = endpoint
        self.key = key
        self.node_id = key.public
        self.max_frame = max_frame

    @classmethod
    async def bind(cls, key: SecretKey, *, listen: str = "127.0.0.1:0",
                   relays: Sequence[str] | None = None, max_frame: int = DEFAULT_MAX_FRAME,
                   connect_timeout: float | None = None, agent: str | None = None
                   ) -> IrohTransport:
        """Bind an endpoint on ``listen`` (``host:port``; port 0 picks a free one)."""
        addrs = [listen]
        other = _other_family(listen)
        if other is not None:
            addrs.append(other)
        try:
            ep = await cls._bind_endpoint(key, addrs, relays)
        except TransportError:
            if len(addrs) == 1:
                raise
            # The other family may be unavailable (no IPv6 on the host): bind only what was asked.
            ep = await cls._bind_endpoint(key, addrs[:1], relays)
        t = cls(ep, key, max_frame)
        if connect_timeout is not None:
            t.connect_timeout = connect_timeout
        if agent is not None:
            t.agent = agent
        return t

    @staticmethod
    async def _bind_endpoint(key: SecretKey, addrs: list[str],
                             relays: Sequence[str] | None) -> Any:
        opts = iroh.EndpointOptions(preset=_ExactBind(addrs, relays), secret_key=key.seed,
                                    alpns=[ALPN])
        try:
            return await iroh.Endpoint.bind(opts)
        except iroh.IrohError as exc:
            raise _wrap(exc, f"cannot bind {addrs}") from None

    def addresses(self) -> list[str]:
        return list(self._ep.addr().direct_addresses())

    async def _dial(self, peer_id: bytes, addresses: Sequence[str]) -> IrohConnection:
        try:
            addr = iroh.EndpointAddr(iroh.EndpointId.from_bytes(peer_id), None, list(addresses))
            conn = await self._ep.connect(addr, ALPN)
        except iroh.IrohError as exc:
            raise _wrap(exc, f"connect to {peer_id.hex()[:10]} failed") from None
        return IrohConnection(conn, self.max_frame)

    async def _accept_raw(self) -> IrohConnection:
        while True:
            try:
                incoming = await self._ep.accept_next()
            except iroh.IrohError as exc:
                raise _wrap(exc, "accept failed") from None
            if incoming is None:
                raise TransportError("endpoint closed")
            try:
                with trio.fail_after(self.handshake_timeout):
                    accepting = await incoming.accept()
                    conn = await accepting.connect()
            except (iroh.IrohError, trio.TooSlowError):
                continue  # a broken incoming connection is the dialler's problem, keep serving
            return IrohConnection(conn, self.max_frame)

    async def aclose(self) -> None:
        """Close the endpoint, waiting at most :data:`CLOSE_WAIT` for its connections to shut
        down. iroh's close waits for every connection, and one whose handshake never completed
        (a dial to a syncnode that is down, cancelled by its timeout) holds it for about 3 s:
        every one-shot ``syncdevice`` command run while a syncnode was unreachable took 3 s
        longer than its ``--wait`` or ``--timeout``. What is left closes in the background."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_WAIT):
            try:
                await self._ep.close()
            except iroh.IrohError:
                pass
