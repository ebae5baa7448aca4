"""Connection-level wire messages: the version handshake and the generic error reply.

Tags ``0x01-0x0F`` (see the tag table in :mod:`proto.codec`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated

from proto.codec import U16, MaxItems, MaxLen, message


class ErrorCode(enum.IntEnum):
    """Reason codes of :class:`ErrorReply`. Stable on the wire: append only."""

    INTERNAL = 1
    MALFORMED = 2
    UNSUPPORTED_VERSION = 3
    UNAUTHORIZED = 4
    NOT_FOUND = 5
    QUOTA_EXCEEDED = 6
    RATE_LIMITED = 7
    CONFLICT = 8
    INVALID = 9
    GONE = 10
    """This syncnode no longer serves the group (a later manifest dropped it): ask the
    syncnodes of the group's newest manifest."""


@message(0x01)
@dataclass(frozen=True)
class Hello:
    """First frame of every connection, from the dialler: the protocol versions it speaks."""

    versions: Annotated[tuple[U16, ...], MaxItems(16)]
    agent: Annotated[str, MaxLen(128)]

    def __post_init__(self) -> None:
        if not self.versions:
            raise ValueError("Hello must offer at least one version")


@message(0x02)
@dataclass(frozen=True)
class HelloAck:
    """The acceptor's answer: the version both sides will use."""

    version: U16
    agent: Annotated[str, MaxLen(128)]


@message(0x03)
@dataclass(frozen=True)
class ErrorReply:
    """A typed error answer to any request; ``detail`` is for humans and logs only."""

    code: ErrorCode
    detail: Annotated[str, MaxLen(1024)]
