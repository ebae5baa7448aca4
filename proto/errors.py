"""The project's typed errors.

Every decoder, key loader and transport raises one of these (never a library's own exception), so
callers can tell "the peer sent garbage" from "we have a bug" and react without losing state.
"""

from __future__ import annotations


class SyncnodeError(Exception):
    """Base class of every error raised on purpose by syncnode code."""


class DecodeError(SyncnodeError):
    """Bytes from outside did not decode into a valid message.

    ``field`` names where decoding failed (``"Hello.versions[2]"``, ``"<frame>"``, ``"<tag>"``),
    so a log line tells an operator what was wrong without dumping attacker-controlled data.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class FrameError(DecodeError):
    """A length-prefixed frame was oversized or truncated."""


class SignatureError(SyncnodeError):
    """A signature did not verify (wrong key, wrong context, or tampered payload)."""


class KeyFileError(SyncnodeError):
    """A key file is missing, malformed, or has unsafe permissions."""


class ConfigError(SyncnodeError):
    """A configuration file or option is invalid."""


class TransportError(SyncnodeError):
    """A connection could not be established or broke."""


class ConnectTimeout(TransportError):
    """A dial did not complete within its deadline."""


class PeerMismatch(TransportError):
    """The peer that answered is not the peer we dialled."""


class HandshakeError(TransportError):
    """The peer speaks no protocol version we support, or broke the handshake."""


class StreamClosed(TransportError):
    """The peer finished or reset the stream; no more frames will arrive."""
