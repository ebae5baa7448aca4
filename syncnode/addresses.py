"""Where the other syncnodes are now: the signed address records this node relays
(:mod:`proto.address`).

Our own record is signed at start with the addresses we listen on; the peer sweep hands it to
every peer syncnode of our groups. Records of other nodes are kept one per node (the newest
``issued_at`` wins), at most ``max_address_records`` of them, and served to anyone: they say
nothing a ticket does not, and a record verifies on its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from proto.address import MAX_SKEW, AddressRecord
from proto.codec import decode_struct, encode_struct
from proto.identity import SecretKey
from syncnode.storage import rows


class AddressBook:
    def __init__(self, key: SecretKey, db: sqlite3.Connection, clock: Callable[[], float],
                 capacity: int) -> None:
        self.key = key
        self.db = db
        self.clock = clock
        self.capacity = capacity
        self.own: AddressRecord | None = None

    def set_own(self, addrs: Sequence[str]) -> AddressRecord:
        self.own = AddressRecord.sign(self.key, tuple(addrs), int(self.clock()))
        return self.own

    def lookup(self, node_ids: Sequence[bytes]) -> list[AddressRecord]:
        out = []
        for node_id in dict.fromkeys(node_ids):
            if node_id == self.key.public:
                if self.own is not None:
                    out.append(self.own)
                continue
            for (blob,) in rows(self.db, "SELECT record FROM address_records WHERE node_id=?",
                                node_id):
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

    def write(self, record: AddressRecord) -> Callable[[sqlite3.Connection], bool]:
        """The write (for the writer thread): keep ``record`` if newer; False if it was not
        (older, or the table is full of other nodes' records)."""
        body = record.body
        blob = encode_struct(record)
        capacity = self.capacity

        def op(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT issued_at FROM address_records WHERE node_id=?",
                            (body.node_id,)).fetchone()
            if row is not None and row[0] >= body.issued_at:
                return False
            if row is None:
                (count,) = c.execute("SELECT count(*) FROM address_records").fetchone()
                if count >= capacity:
                    return False
            c.execute("INSERT OR REPLACE INTO address_records VALUES (?,?,?)",
                      (body.node_id, body.issued_at, blob))
            return True

        return op
