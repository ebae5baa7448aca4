"""One connection as the syncnode sees it: its :class:`Session` (who it proved to be, what it
may still spend), proving a key (challenge and signed response), and :class:`RequestError`, the
refusal every part of the service raises.

Kept apart so every part of the service (and the mailbox, the server and the peer sync) can use
them without importing the service itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proto import entropy
from proto.codec import encode_struct
from proto.errors import SyncnodeError
from proto.identity import fingerprint, is_valid_signature
from proto.messages import ErrorCode, ErrorReply
from proto.service import AUTH_CTX, AuthBody, Authenticate, Authenticated, Challenge
from syncnode.budgets import TokenBucket


class RequestError(SyncnodeError):
    """A request is refused; becomes an :class:`ErrorReply` and changes nothing."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code
        self.detail = detail

    def reply(self) -> ErrorReply:
        return ErrorReply(self.code, self.detail[:1024])


@dataclass
class Session:
    """What the syncnode knows about one connection."""

    remote_id: bytes
    bucket: TokenBucket
    nonce: bytes | None = None
    keys: dict[bytes, bytes] = field(default_factory=dict)
    """Authenticated device keys: fingerprint -> signature public key."""
    groups_created: int = 0
    counted: set[str] = field(default_factory=set)
    """Refusal reasons counted once per connection (a legitimate client may repeat them)."""


def challenge(session: Session) -> Challenge:
    """A fresh nonce for the session to sign (each one is good for one attempt)."""
    session.nonce = entropy.token_bytes(32)
    return Challenge(session.nonce)


def authenticate(node_id: bytes, session: Session, msg: Authenticate) -> Authenticated:
    """Add a device key to the session if it signed this node, this connection's endpoint and
    the session's last nonce."""
    nonce, session.nonce = session.nonce, None  # single use
    if nonce is None:
        raise RequestError(ErrorCode.UNAUTHORIZED, "ask for a challenge first")
    body = AuthBody(node_id, session.remote_id, nonce)
    if not is_valid_signature(msg.public_key, AUTH_CTX, encode_struct(body), msg.signature):
        raise RequestError(ErrorCode.UNAUTHORIZED, "challenge signature does not verify")
    fpr = fingerprint(msg.public_key)
    session.keys[fpr] = msg.public_key
    return Authenticated(fpr)
