"""Address tickets: a short, copy-pasteable string that says how to reach a syncnode.

``sn1`` followed by lowercase base32 (no padding) of the canonical encoding of the node id and its
addresses. The node id authenticates the connection (iroh checks the endpoint key), so a stale or
tampered address can at worst fail to connect, never reach an impostor.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Annotated

from proto.codec import MaxItems, MaxLen, PublicKey, decode_struct, encode_struct
from proto.errors import DecodeError

PREFIX = "sn1"
MAX_TICKET_CHARS = 2048


@dataclass(frozen=True)
class NodeTicket:
    node_id: PublicKey
    addrs: Annotated[tuple[Annotated[str, MaxLen(128)], ...], MaxItems(8)]

    def __str__(self) -> str:
        raw = base64.b32encode(encode_struct(self)).decode("ascii").rstrip("=").lower()
        return PREFIX + raw

    @classmethod
    def parse(cls, text: str) -> NodeTicket:
        """Parse a ticket; raises :class:`DecodeError` with a readable reason."""
        text = text.strip()
        if len(text) > MAX_TICKET_CHARS:
            raise DecodeError("<ticket>", "too long")
        if not text.startswith(PREFIX):
            raise DecodeError("<ticket>", f"a syncnode ticket starts with {PREFIX!r}")
        body = text[len(PREFIX):].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except ValueError:
            raise DecodeError("<ticket>", "not base32") from None
        return decode_struct(raw, cls)
