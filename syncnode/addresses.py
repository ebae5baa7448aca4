"""Where the other syncnodes are now: the signed address records this node relays
(:mod:`proto.address`).

Our own record is signed at start with the addresses we listen on; the peer sweep hands it to
every peer syncnode of our groups. Records of other nodes are kept one per node (the newest
``issued_at`` wins), at most ``max_address_records`` of them, and served to anyone: they say
nothing a ticket does not, and a record verifies on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from proto.address import MAX_SKEW, AddressRecord
from proto.codec import decode_struct, encode_struct
from proto.identity import SecretKey
from syncnode.storage import Storage


class AddressBook:
    def __init__(self, key: SecretKey, store: Storage, clock: Callable[[], float],
                 capacity: int) -> None:
        self.key = key
        self.store = store
        self.clock = clock
        self.capacity = capacity
        self.own: AddressRecord | None = None

    def set_own(self, addrs: Sequence[str]) -> AddressRecord:
        self.own = AddressRecord.sign(self.key, tuple(addrs), int(self.clock()))
        return self.own

    async def lookup(self, node_ids: Sequence[bytes]) -> list[AddressRecord]:
        out = []
        for node_id in dict.fromkeys(node_ids):
            if node_id == self.key.public:
                if self.own is not None:
                    out.append(self.own)
                continue
            blob = await self.store.address_record(node_id)
            if blob is not None:
                out.append(decode_struct(blob, AddressRecord))
        return out

    def check(self, record: AddressRecord) -> str | None:
        """Why ``record`` cannot be kept, or None."""
        body = record.body
        if body.node_id == self.key.public:
            return "that is this node's own record"
        if body.issued_at > self.clock() + MAX_SKEW:
            return "issued in the future"
        if not record.verify():
            return "bad signature"
        return None

    async def keep(self, record: AddressRecord) -> bool:
        """Keep ``record`` (checked: :meth:`check`) if it is newer than the one kept; False if
        it was not (older, or the book is full of other nodes' records)."""
        body = record.body
        return await self.store.put_address_record(body.node_id, body.issued_at,
                                                   encode_struct(record), capacity=self.capacity)
