"""The signed envelope around an encrypted application message (DESIGN.md "Application messages").

The envelope lets a syncnode check, without decrypting, that an update comes from a current
member (signature by the device's MLS key, looked up in the manifest) and store it idempotently
under ``(group, sender, seq)``. ``seq`` counts per sender from 1 with no gaps, which is what makes
backfill by per-sender watermark possible. The encrypted plaintext repeats ``(sender, seq)`` so
receivers can check the envelope against the MLS-authenticated sender.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated

from proto.codec import U64, Hash32, MaxLen, Signature64, encode_struct, message
from proto.identity import SecretKey, fingerprint, is_valid_signature, register_context
from proto.paxos.messages import GroupId

ENVELOPE_CTX = register_context("syncnode/envelope/v1")
MAX_CIPHERTEXT = 4 * 1024 * 1024


@dataclass(frozen=True)
class EnvelopeBody:
    group_id: GroupId
    sender: Hash32
    seq: U64
    epoch: U64
    ciphertext: Annotated[bytes, MaxLen(MAX_CIPHERTEXT)]


@message(0x4A)
@dataclass(frozen=True)
class Envelope:
    group_id: GroupId
    sender: Hash32
    seq: U64
    epoch: U64
    ciphertext: Annotated[bytes, MaxLen(MAX_CIPHERTEXT)]
    signature: Signature64

    def body(self) -> EnvelopeBody:
        return EnvelopeBody(self.group_id, self.sender, self.seq, self.epoch, self.ciphertext)

    @cached_property
    def signed_bytes(self) -> bytes:
        """The canonical encoding of the body; a syncnode both verifies and hashes it."""
        return encode_struct(self.body())

    def verify(self, sig_pub: bytes) -> bool:
        return is_valid_signature(sig_pub, ENVELOPE_CTX, self.signed_bytes, self.signature)

    def digest(self) -> bytes:
        """Identity of the signed content: two envelopes with one (sender, seq) must match."""
        return hashlib.blake2b(self.signed_bytes, digest_size=32,
                               person=b"syncnode-envelope"[:16]).digest()

    @classmethod
    def seal(cls, key: SecretKey, group_id: bytes, seq: int, epoch: int, ciphertext: bytes
             ) -> Envelope:
        body = EnvelopeBody(group_id, fingerprint(key.public), seq, epoch, ciphertext)
        sig = key.sign(ENVELOPE_CTX, encode_struct(body))
        return cls(body.group_id, body.sender, seq, epoch, ciphertext, sig)
