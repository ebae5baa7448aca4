"""Address tickets: a short, copy-pasteable string that says how to reach a syncnode.

``sn1`` followed by lowercase base32 (no padding) of the canonical encoding of the node id and its
addresses. The node id authenticates the connection (iroh checks the endpoint key), so a stale or
tampered address can at worst fail to connect, never reach an impostor.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
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


def preferred(first: Sequence[str], then: Sequence[str]) -> tuple[str, ...]:
    """Dialling hints: ``first`` (newer: set by hand or a signed record), then those of
    ``then`` not already in it, at most the 8 a ticket holds."""
    return (tuple(first) + tuple(a for a in then if a not in first))[:8]


def same_family(addresses: Sequence[str], listen_host: str) -> list[str]:
    """The addresses of ``listen_host``'s IP family (all of them if that leaves none).

    Given only an IPv4 bind address, iroh adds a socket of the other family with a random port
    at every start; a hint for it goes stale at once, and it is not what the operator
    configured. Syncnode tickets and device hints both hold only the ``listen`` family."""
    v6 = listen_host.startswith("[")
    same = [a for a in addresses if a.startswith("[") == v6]
    return same or list(addresses)


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
