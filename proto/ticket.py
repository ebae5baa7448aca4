"""Address tickets: a short, copy-pasteable string that says how to reach a syncnode.

``sn1`` followed by lowercase base32 (no padding) of the canonical encoding of the node id and its
addresses. The node id authenticates the connection (iroh checks the endpoint key), so a stale or
tampered address can at worst fail to connect, never reach an impostor.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Annotated, TypeVar

from proto.codec import MaxItems, MaxLen, PublicKey, decode_struct, encode_struct
from proto.errors import DecodeError

PREFIX = "sn1"
MAX_TICKET_CHARS = 2048

Addrs = Annotated[tuple[Annotated[str, MaxLen(128)], ...], MaxItems(8)]
"""Dialling hints for an endpoint (``host:port``); the endpoint id authenticates."""


T = TypeVar("T")


def to_text(prefix: str, value: object) -> str:
    """``prefix`` + lowercase unpadded base32 of the canonical encoding of ``value``."""
    return prefix + base64.b32encode(encode_struct(value)).decode("ascii").rstrip("=").lower()


def from_text(prefix: str, text: str, cls: type[T], *, field: str, kind: str,
              max_chars: int) -> T:
    """Inverse of :func:`to_text`; raises :class:`DecodeError` (naming ``field``; ``kind``
    says what the text should be, e.g. "a syncnode ticket")."""
    if len(text) > max_chars:
        raise DecodeError(field, "too long")
    if not text.startswith(prefix):
        raise DecodeError(field, f"{kind} starts with {prefix!r}")
    body = text[len(prefix):].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise DecodeError(field, "not base32") from None
    return decode_struct(raw, cls)


@dataclass(frozen=True)
class NodeTicket:
    node_id: PublicKey
    addrs: Addrs

    def __str__(self) -> str:
        return to_text(PREFIX, self)

    @classmethod
    def parse(cls, text: str) -> NodeTicket:
        """Parse a ticket; raises :class:`DecodeError` with a readable reason."""
        return from_text(PREFIX, text.strip(), cls, field="<ticket>", kind="a syncnode ticket",
                         max_chars=MAX_TICKET_CHARS)
