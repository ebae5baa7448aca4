"""Signed address records relayed by syncnodes (proto.address): what a syncnode keeps and
serves, and what it refuses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from proto.address import MAX_SKEW, AddressRecord
from proto.identity import SecretKey
from proto.messages import ErrorCode
from proto.rpc import RemoteError
from proto.transport.memory import MemoryNetwork
from syncnode.config import Limits
from tests.syncnode_kit import MemoryCluster


async def test_records_are_verified_kept_newest_first_and_bounded(tmp_path: Path) -> None:
    net = MemoryNetwork(seed=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        cluster = MemoryCluster(net, nursery, tmp_path, Limits(max_address_records=2))
        node = await cluster.start_node()
        own = node.service.addresses.set_own(["127.0.0.1:7600"])
        moved, other, third = SecretKey.generate(), SecretKey.generate(), SecretKey.generate()
        now = int(time.time())
        async with cluster.clients() as (c,):  # no authentication needed: records are public
            assert await c.get_addresses([node.key.public]) == [own]
            old = AddressRecord.sign(moved, ("10.0.0.1:1",), now - 10)
            new = AddressRecord.sign(moved, ("10.0.0.2:2",), now)
            assert await c.put_address(new)
            assert not await c.put_address(old)  # an older record never wins
            assert await c.get_addresses([moved.public, moved.public]) == [new]
            # Forged, altered, from the future, or our own: refused.
            forged = AddressRecord(new.body, other.sign("syncnode/address/v1", b"x"))
            future = AddressRecord.sign(other, ("10.0.0.3:3",), now + MAX_SKEW + 60)
            mine = AddressRecord.sign(node.key, ("6.6.6.6:6",), now)
            for bad, why in ((forged, "bad signature"), (future, "future"), (mine, "own")):
                with pytest.raises(RemoteError) as err:
                    await c.put_address(bad)
                assert err.value.code == ErrorCode.INVALID and why in err.value.detail
            # Bounded: one record per node, at most max_address_records nodes.
            assert await c.put_address(AddressRecord.sign(other, ("10.0.0.4:4",), now))
            assert not await c.put_address(AddressRecord.sign(third, ("10.0.0.5:5",), now))
            assert await c.get_addresses([third.public]) == []
            # A newer record of a known node still replaces its old one at capacity.
            newest = AddressRecord.sign(moved, ("10.0.0.6:6",), now + 1)
            assert await c.put_address(newest)
            assert await c.get_addresses([moved.public]) == [newest]
        nursery.cancel_scope.cancel()
