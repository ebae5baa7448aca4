"""Causal delivery of decrypted payloads (sans-IO).

Receivers may get a sender's messages out of order, twice, or before the messages they depend
on (live push and backfill race, syncnodes differ). The engine, not the CRDT library, enforces
causal order (notes/crdt.md: some libraries lose updates otherwise): a payload is delivered
only after the sender's previous one and everything in its dependency vector. ``delivered`` is
a per-sender watermark: sender ``s`` has delivered exactly seqs ``1..delivered[s]``, which makes
dedup a comparison and lets a ``STATE`` payload mark a whole vector delivered at once.
"""

from __future__ import annotations

from collections.abc import Iterable

from proto.errors import DecodeError
from proto.payload import Payload, PayloadKind


class CausalBuffer:
    def __init__(self, delivered: dict[bytes, int] | None = None,
                 pending: Iterable[Payload] = ()) -> None:
        self.delivered: dict[bytes, int] = dict(delivered or {})
        self.pending: dict[tuple[bytes, int], Payload] = {}
        for p in pending:
            self.pending[(p.sender, p.seq)] = p

    def seen(self, sender: bytes, seq: int) -> bool:
        """Delivered or waiting already: a copy of it is a duplicate."""
        return seq <= self.delivered.get(sender, 0) or (sender, seq) in self.pending

    def watermarks(self) -> dict[bytes, int]:
        """Per sender, the highest seq with every seq up to it delivered or waiting: what to
        ask backfill for (``seq`` above it)."""
        out = dict(self.delivered)
        for sender, _ in sorted(self.pending):
            while (sender, out.get(sender, 0) + 1) in self.pending:
                out[sender] = out.get(sender, 0) + 1
        return out

    def add(self, payload: Payload) -> list[Payload]:
        """Offer a payload; returns the payloads that became deliverable, in delivery order
        (possibly empty; possibly including earlier buffered ones). Duplicates return []."""
        return self.add_many([payload])

    def add_many(self, payloads: Iterable[Payload]) -> list[Payload]:
        """:meth:`add` for a batch (one drain pass for all of them)."""
        for payload in payloads:
            if payload.kind == PayloadKind.STATE and \
                    payload.vector().get(payload.sender, 0) < payload.seq - 1:
                raise DecodeError("Payload.deps", "a STATE payload must cover its sender's past")
            if not self.seen(payload.sender, payload.seq):
                self.pending[(payload.sender, payload.seq)] = payload
        return self._drain()

    def _ready(self, p: Payload) -> bool:
        return all(self.delivered.get(d.sender, 0) >= d.seq for d in p.deps
                   if d.sender != p.sender)

    def cover(self, vector: dict[bytes, int]) -> None:
        """Mark everything up to ``vector`` delivered (a state that contains it was loaded)."""
        for sender, seq in vector.items():
            if seq > self.delivered.get(sender, 0):
                self.delivered[sender] = seq
        for key in [k for k in self.pending if k[1] <= self.delivered.get(k[0], 0)]:
            del self.pending[key]

    def _deliver(self, p: Payload) -> None:
        del self.pending[(p.sender, p.seq)]
        if p.kind == PayloadKind.STATE:
            self.cover(p.vector())
        self.delivered[p.sender] = max(self.delivered.get(p.sender, 0), p.seq)

    def _drain(self) -> list[Payload]:
        out: list[Payload] = []
        progress = True
        while progress and self.pending:
            progress = False
            for p in [p for p in self.pending.values() if p.kind == PayloadKind.STATE]:
                if (p.sender, p.seq) in self.pending:  # an earlier STATE may have covered it
                    self._deliver(p)
                    out.append(p)
                    progress = True
            for sender in {k[0] for k in self.pending}:
                while True:
                    nxt = self.pending.get((sender, self.delivered.get(sender, 0) + 1))
                    if nxt is None or not self._ready(nxt):
                        break
                    self._deliver(nxt)
                    out.append(nxt)
                    progress = True
        return out

    def mark_delivered(self, sender: bytes, seq: int) -> None:
        """Our own payloads are delivered the moment we create them."""
        self.delivered[sender] = max(self.delivered.get(sender, 0), seq)
