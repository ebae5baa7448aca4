"""The acceptor's slot cache over a storage whose reads take time (a server database): a load
that raced a promise on the same slot must never bring back the older state, even when the
promise was written and evicted before the load's read returned."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from proto.codec import encode
from proto.paxos.acceptor import EMPTY, SlotState
from proto.paxos.messages import AcceptorRecord, Ballot
from syncnode.acceptor import SlotCache

G = b"\x01" * 16


class SlowReads:
    """Answers an acceptor read with what was stored when the read started, once released."""

    def __init__(self) -> None:
        self.records: dict[tuple[bytes, int], bytes] = {}
        self.reading = trio.Event()
        self.release = trio.Event()
        self.reads = 0

    async def acceptor_record(self, group_id: bytes, slot: int) -> bytes | None:
        blob = self.records.get((group_id, slot))
        self.reads += 1
        self.reading.set()
        await self.release.wait()
        return blob


async def test_a_racing_load_never_resurrects_an_older_promise() -> None:
    store = SlowReads()
    cache = SlotCache(store, capacity=1)  # type: ignore[arg-type]
    key = (G, 1)
    newer = SlotState(Ballot(7, b"p" * 32), None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.load, key)
        await store.reading.wait()  # the read saw no record
        cache[key] = newer  # a promise on the same slot, meanwhile ...
        store.records[key] = encode(AcceptorRecord(G, 1, newer.promised, None))
        cache.flushed(key, newer)  # ... made durable ...
        cache.lru.put((G, 2), EMPTY)  # ... and evicted by other slots
        assert not cache.loaded(key)
        store.release.set()
    assert cache[key] == newer and store.reads == 2  # read again, not the stale answer


async def test_state_is_loaded_before_the_acceptor_reads_it() -> None:
    store = SlowReads()
    store.release.set()
    cache = SlotCache(store, capacity=4)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="before it was loaded"):
        cache.get((G, 1), EMPTY)
    await cache.load((G, 1))
    assert cache.get((G, 1), EMPTY) == EMPTY  # loaded: never written
    state: Any = SlotState(Ballot(1, b"q" * 32), None)
    cache[(G, 1)] = state
    await cache.load((G, 1))  # loaded already: nothing read
    assert cache[(G, 1)] == state and store.reads == 1
