"""Protocol version negotiation, run on the first stream of every connection.

The dialler opens a stream and sends :class:`proto.messages.Hello` with the versions it speaks;
the acceptor answers :class:`proto.messages.HelloAck` with the highest common one, or an
:class:`proto.messages.ErrorReply` (``UNSUPPORTED_VERSION``) and closes. The stream is then
finished by both sides; application streams follow.
"""

from __future__ import annotations

import trio

from proto import SUPPORTED_VERSIONS
from proto.codec import decode, encode
from proto.errors import DecodeError, HandshakeError, StreamClosed, TransportError
from proto.messages import ErrorCode, ErrorReply, Hello, HelloAck
from proto.transport.connection import Connection

HANDSHAKE_MAX_FRAME = 4096
REFUSAL_LINGER = 1.0


async def client_handshake(conn: Connection, agent: str,
                           versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> int:
    stream = await conn.open_stream()
    try:
        await stream.send(encode(Hello(versions=versions, agent=agent)))
        try:
            reply = decode(await stream.receive(), max_bytes=HANDSHAKE_MAX_FRAME)
        except StreamClosed:
            raise HandshakeError("peer closed the connection during the handshake") from None
        except DecodeError as exc:
            raise HandshakeError(f"malformed handshake reply: {exc}") from None
        if isinstance(reply, ErrorReply):
            raise HandshakeError(f"peer refused the handshake: {reply.code.name}: {reply.detail}")
        if not isinstance(reply, HelloAck) or reply.version not in versions:
            raise HandshakeError(f"unexpected handshake reply {type(reply).__name__}")
        conn.protocol_version = reply.version
        conn.remote_agent = reply.agent
        await stream.send_eof()
        return reply.version
    finally:
        await stream.aclose()


async def server_handshake(conn: Connection, agent: str,
                           versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> int:
    stream = await conn.accept_stream()
    try:
        try:
            hello = decode(await stream.receive(), max_bytes=HANDSHAKE_MAX_FRAME)
        except (StreamClosed, DecodeError) as exc:
            raise HandshakeError(f"bad handshake from peer: {exc}") from None
        if not isinstance(hello, Hello):
            raise HandshakeError(f"expected Hello, got {type(hello).__name__}")
        common = set(hello.versions) & set(versions)
        if not common:
            await stream.send(encode(ErrorReply(
                ErrorCode.UNSUPPORTED_VERSION,
                f"we speak versions {list(versions)}, peer offered {list(hello.versions)}")))
            await stream.send_eof()
            # Let the refusal reach the dialler before the connection is torn down: wait
            # (briefly) for it to hang up after reading our answer.
            with trio.move_on_after(REFUSAL_LINGER):
                try:
                    await stream.receive()
                except TransportError:
                    pass
            raise HandshakeError(f"no common protocol version with peer {list(hello.versions)}")
        version = max(common)
        await stream.send(encode(HelloAck(version=version, agent=agent)))
        await stream.send_eof()
        conn.protocol_version = version
        conn.remote_agent = hello.agent
        return version
    finally:
        await stream.aclose()
