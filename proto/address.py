"""Signed address records: how devices follow a syncnode that moved (tags ``0x57-0x59``).

A document's manifest names its syncnodes with the addresses they had when they were added. A
syncnode that comes back on another address signs a record of its current addresses with its
node key and hands it to the other syncnodes of its groups (:class:`PutAddress`); they keep the
newest record per node and serve it to anyone who asks (:class:`GetAddresses`). A device that
still reaches one syncnode of a group thus learns where the others are now. The record is
self-authenticating: a relaying syncnode cannot forge or alter it, only withhold it or serve an
older one (which loses against a newer ``issued_at``); and the node id still authenticates the
connection, so a wrong address can at worst fail to connect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from proto.codec import U64, MaxItems, PublicKey, Signature64, encode_struct, message
from proto.identity import SecretKey, is_valid_signature, register_context
from proto.paxos.messages import MAX_ACCEPTORS
from proto.ticket import Addrs

ADDRESS_CTX = register_context("syncnode/address/v1")
MAX_SKEW = 300
"""A record issued further than this in the future (by the receiver's clock) is refused: it
would win against every later record of that node."""


@dataclass(frozen=True)
class AddressBody:
    node_id: PublicKey
    addrs: Addrs
    issued_at: U64
    """Wall-clock seconds; the newest record of a node wins."""


@dataclass(frozen=True)
class AddressRecord:
    body: AddressBody
    signature: Signature64

    @classmethod
    def sign(cls, key: SecretKey, addrs: tuple[str, ...], issued_at: int) -> AddressRecord:
        body = AddressBody(key.public, tuple(addrs[:8]), issued_at)
        return cls(body, key.sign(ADDRESS_CTX, encode_struct(body)))

    def verify(self) -> bool:
        return is_valid_signature(self.body.node_id, ADDRESS_CTX, encode_struct(self.body),
                                  self.signature)


@message(0x57)
@dataclass(frozen=True)
class GetAddresses:
    """The newest records this syncnode holds for ``node_ids`` (its own always)."""

    node_ids: Annotated[tuple[PublicKey, ...], MaxItems(MAX_ACCEPTORS)]


@message(0x58)
@dataclass(frozen=True)
class Addresses:
    records: Annotated[tuple[AddressRecord, ...], MaxItems(MAX_ACCEPTORS)]


@message(0x59)
@dataclass(frozen=True)
class PutAddress:
    """Keep ``record`` (if it verifies and is newer than the one held) and serve it."""

    record: AddressRecord
