"""Issue 14, finding 4: one syncnode of three serves a forged genesis under the group's id.

The group is bound to its genesis by the invite ticket (:func:`proto.manifest.genesis_hash`),
and the new device verifies each syncnode's answers on their own, so the forging syncnode spoils
only its own answers and the join completes from the honest two. Without both defences (the
join as it was), the same attack leaves the inviter with a member nobody holds.

The forging syncnode is the simulator's :class:`~simulations.byzantine.ForgedGenesisService`
(the real service with ``FetchDecided``/``FetchHeads`` bent), in an in-memory cluster: a fake
syncnode process is not needed to prove the device side, and the simulator's ``forge``
scenario sweeps the same attacker over many seeds (with its negative control)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from device.agent import JoinError
from device.joining import _check_inviter, _genesis_of
from proto.identity import SecretKey
from proto.invite import InviteTicket
from proto.manifest import ManifestError, Rule, genesis_hash
from proto.transport.memory import Faults, MemoryNetwork
from simulations.broken import planted
from simulations.byzantine import ForgedGenesisService
from tests.device_kit import converged, memory_device
from tests.syncnode_kit import MemoryCluster, Node

SLOWER = Faults(min_delay=0.02, max_delay=0.04, ordered=True)


async def _forging_node(cluster: MemoryCluster) -> tuple[Node, ForgedGenesisService]:
    """A node of ``cluster`` running the forging service."""
    node = await cluster.start_node(service_class=ForgedGenesisService)
    assert isinstance(node.service, ForgedGenesisService)
    return node, node.service


async def _cluster(tmp_path: Path, nursery: trio.Nursery, net: MemoryNetwork
                   ) -> tuple[list[Node], ForgedGenesisService]:
    await nursery.start(net.run)
    cluster = MemoryCluster(net, nursery, tmp_path)
    forger, service = await _forging_node(cluster)  # first in the document's list
    honest = [await cluster.start_node() for _ in range(2)]
    for node in honest:  # the forger answers first, as the attack wants
        net.set_node_faults(node.key.public, SLOWER)
    return [forger, *honest], service


async def test_a_join_completes_despite_a_forging_syncnode(tmp_path: Path) -> None:
    net = MemoryNetwork(seed=41)
    async with trio.open_nursery() as nursery:
        nodes, forger = await _cluster(tmp_path, nursery, net)
        async with memory_device(net, tmp_path / "a") as a, \
                memory_device(net, tmp_path / "b") as b, \
                memory_device(net, tmp_path / "c") as c:
            doc = await a.create_document([n.ticket for n in nodes])
            doc.change(lambda e: e.map("m").insert("k", 1))
            ticket = doc.invite()
            t = InviteTicket.parse(ticket)
            assert t.genesis == genesis_hash(doc.values[0].encode())
            started = trio.current_time()
            with trio.fail_after(30):
                joined = await b.join(ticket)
            elapsed = trio.current_time() - started
            assert forger.forgeries > 0  # it did serve its forgery to the joiner
            assert joined.values[0] == doc.values[0]
            assert joined.value() == doc.value()
            assert elapsed < 5.0, elapsed
            # Members carry on as usual; a second join completes too.
            await doc.rotate_keys()
            with trio.fail_after(30):
                joined_c = await c.join(doc.invite())
            joined.change(lambda e: e.map("m").insert("b", 2))
            await converged([doc, joined, joined_c])
            assert not [x for d in (doc, joined, joined_c) for x in d.alarms()
                        if x.kind in ("equivocation", "invalid-decision")]
        nursery.cancel_scope.cancel()


async def test_without_the_genesis_check_the_join_never_completes(tmp_path: Path) -> None:
    """The negative control of the test above: the join as it was (any well-formed genesis, one
    log for all syncnodes) under the same attack. The inviter adds the device, which never
    gets past the forged genesis."""
    net = MemoryNetwork(seed=41)
    async with trio.open_nursery() as nursery:
        nodes, forger = await _cluster(tmp_path, nursery, net)
        async with memory_device(net, tmp_path / "a") as a, \
                memory_device(net, tmp_path / "b") as b:
            doc = await a.create_document([n.ticket for n in nodes])
            bug = planted("trust-first-genesis", None)  # type: ignore[arg-type]
            with bug, pytest.raises(JoinError, match="no success after"):
                await b.join(doc.invite(), timeout=5)
            assert forger.forgeries > 0
            assert b.id in {m.id for m in doc.members()}  # added, and nobody holds it
        nursery.cancel_scope.cancel()


def test_only_the_genesis_the_ticket_names_is_taken() -> None:
    from proto.manifest import SyncnodeEntry, genesis

    gid = b"\x01" * 32
    nodes = (SyncnodeEntry(SecretKey.generate().public, ()),)
    creator, forger = SecretKey.generate(), SecretKey.generate()
    real = genesis(creator, gid, creator.public, nodes, "loro")
    forged = genesis(forger, gid, forger.public, nodes, "loro")  # well formed, self-signed
    t = InviteTicket(gid, genesis_hash(real.encode()), creator.public, creator.public, (),
                     nodes, b"s" * 16, 1 << 40)
    assert InviteTicket.parse(str(t)).genesis == t.genesis
    assert _genesis_of(t, real.encode()) == real
    with pytest.raises(ManifestError) as err:
        _genesis_of(t, forged.encode())
    assert err.value.rule == Rule.BAD_GENESIS
    _check_inviter(t, real.manifest)
    with pytest.raises(JoinError, match="inviter is not a member"):
        _check_inviter(t, forged.manifest)
