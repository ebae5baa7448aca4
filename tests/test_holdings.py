"""Signed holdings statements and withholding proofs (:mod:`proto.holdings`): every kind of
contradiction is proven, every forged or tampered proof is refused, statements of two
incarnations of a node's storage prove nothing, honest statements never contradict each other;
and the syncnode's real statements (SQLite, memory transport) follow the rules, its statement
clock across a restart with the wall clock set back included, its incarnation across a restart
kept and across a lost database new."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from device.witness import ack_of, backfill_of
from proto.codec import decode_as, encode, encode_struct
from proto.compaction import CompactionPoint, Covered
from proto.holdings import (
    ACK_CTX,
    BACKFILL_CTX,
    HEADS_CTX,
    AckBody,
    BackfillBody,
    Entry,
    HeadsBody,
    Probe,
    ProofError,
    SignedAck,
    SignedBackfill,
    SignedHeads,
    WithholdingProof,
    contradiction,
    verify,
)
from proto.identity import SecretKey
from proto.resets import StorageReset, reset_between, verify_reset
from proto.service import Watermark
from proto.stampclock import RESERVE_MS, StampClock, backdated
from simulations.byzantine import WithholdingService
from tests.syncnode_kit import Device, MemoryCluster, new_group
from tests.test_syncnode_history import cluster, seal  # noqa: F401

NODE, OTHER = SecretKey(b"n" * 32), SecretKey(b"o" * 32)
G, G2 = b"g" * 16, b"h" * 16
S, T = b"s" * 32, b"t" * 32
D5, DX = b"5" * 32, b"x" * 32
INC, INC2 = b"i" * 16, b"j" * 16


def ack(seq: int = 5, at: int = 100, *, key: SecretKey = NODE, group: bytes = G,
        digest: bytes = D5, inc: bytes = INC) -> SignedAck:
    body = AckBody(key.public, inc, group, S, seq, digest, at)
    return SignedAck(*dataclasses.astuple(body), key.sign(ACK_CTX, encode_struct(body)))


def heads(marks: dict[bytes, int], at: int = 200, probes: tuple[Probe, ...] = (), *,
          key: SecretKey = NODE, group: bytes = G, inc: bytes = INC,
          covered: dict[bytes, int] | None = None) -> SignedHeads:
    cov = tuple(Watermark(s, q) for s, q in (covered or {}).items())
    body = HeadsBody(key.public, inc, group, 3,
                     tuple(Watermark(s, q) for s, q in marks.items()), probes, at, cov)
    return SignedHeads(key.public, inc, group, 3, body.marks, probes, at,
                       key.sign(HEADS_CTX, encode_struct(body)), cov)


def backfill(marks: dict[bytes, int], entries: tuple[Entry, ...] = (), *, more: bool = False,
             at: int = 200, key: SecretKey = NODE, inc: bytes = INC,
             covered: dict[bytes, int] | None = None) -> SignedBackfill:
    wm = tuple(Watermark(s, q) for s, q in marks.items())
    cov = tuple(Watermark(s, q) for s, q in (covered or {}).items())
    body = BackfillBody(key.public, inc, G, wm, entries, more, at, cov)
    return SignedBackfill(key.public, inc, G, wm, entries, more, at,
                          key.sign(BACKFILL_CTX, encode_struct(body)), cov)


def roundtrip(proof: WithholdingProof) -> WithholdingProof:
    return decode_as(encode(proof), WithholdingProof)


# -- each kind of contradiction ------------------------------------------------------------------


@pytest.mark.parametrize(("held", "lack", "seq", "kinds"), [
    (ack(), heads({}, probes=(Probe(S, 5, None),)), 5, ("ack", "heads")),
    (ack(), heads({}, probes=(Probe(S, 5, DX),)), 5, ("ack", "heads")),  # another envelope
    (ack(), heads({S: 4}), 5, ("ack", "heads")),  # watermark stops just before it
    (ack(), backfill({S: 2}), 5, ("ack", "backfill answer")),
    (ack(), backfill({}, (Entry(S, 5, DX),)), 5, ("ack", "backfill answer")),
    (heads({S: 9}, at=100), heads({S: 6}), 7, ("heads", "heads")),  # shrank
    (heads({S: 9}, at=100), heads({S: 9}, probes=(Probe(S, 8, None),)), 8, ("heads", "heads")),
    (heads({S: 9}, at=100), backfill({S: 3}, (Entry(S, 4, DX),)), 5,
     ("heads", "backfill answer")),
    (heads({}, at=100, probes=(Probe(S, 5, D5),)), heads({S: 4}), 5, ("heads", "heads")),
])
def test_each_contradiction_is_found_and_proves_itself(held: SignedAck | SignedHeads,
                                                       lack: SignedHeads | SignedBackfill,
                                                       seq: int, kinds: tuple[str, str]) -> None:
    proof = contradiction(held, lack)
    assert proof is not None and (proof.sender, proof.seq) == (S, seq)
    finding = verify(roundtrip(proof))  # the proof alone, after the wire
    assert (finding.node_id, finding.group_id, finding.sender, finding.seq) == (
        NODE.public, G, S, seq)
    assert (finding.held_kind, finding.lack_kind) == kinds
    assert NODE.public.hex() in finding.describe()


@pytest.mark.parametrize(("held", "lack"), [
    (ack(), heads({S: 5})),  # holds it
    (ack(), heads({S: 3})),  # a gap before it: says nothing about seq 5
    (ack(), heads({T: 0}, probes=(Probe(S, 5, D5),))),
    (ack(), backfill({S: 5})),  # not asked for
    (ack(), backfill({S: 2}, more=True)),  # not a complete answer
    (ack(), backfill({}, (Entry(S, 5, D5),))),  # served
    (ack(at=300), heads({S: 0})),  # the heads are older than the ack
    (ack(), heads({S: 0}, key=OTHER)),  # another syncnode's
    (ack(), heads({S: 0}, group=G2)),
    (ack(), heads({S: 4}, inc=INC2)),  # it lost its storage in between: not withholding
    (ack(), backfill({S: 2}, inc=INC2)),
    (heads({S: 9}, at=100), heads({S: 6}, inc=INC2)),
    (heads({S: 9}, at=100), heads({S: 9})),
    (heads({S: 9}, at=100), heads({T: 0})),  # nothing said about S later
    (heads({S: 9}, at=100), backfill({S: 3}, tuple(Entry(S, q, D5) for q in range(4, 12)))),
])
def test_consistent_statements_prove_nothing(held: SignedAck | SignedHeads,
                                             lack: SignedHeads | SignedBackfill) -> None:
    assert contradiction(held, lack) is None


# -- forged and tampered proofs -----------------------------------------------------------------


GOOD = WithholdingProof(S, 5, held_ack=ack(), lack_heads=heads({S: 4}))


def resign_ack(a: SignedAck, **change: object) -> SignedAck:
    """A field changed after signing (the signature is the old one)."""
    return dataclasses.replace(a, **change)  # type: ignore[arg-type]


@pytest.mark.parametrize(("proof", "why"), [
    (dataclasses.replace(GOOD, held_ack=None), "exactly one"),
    (dataclasses.replace(GOOD, lack_heads=None), "exactly one"),
    (dataclasses.replace(GOOD, held_heads=heads({S: 5}, at=50)), "exactly one"),
    (dataclasses.replace(GOOD, lack_backfill=backfill({})), "exactly one"),
    (dataclasses.replace(GOOD, held_ack=ack(key=OTHER)), "different syncnodes"),
    (dataclasses.replace(GOOD, held_ack=ack(group=G2)), "different groups"),
    (dataclasses.replace(GOOD, held_ack=resign_ack(ack(), seq=6)), "signature"),
    (dataclasses.replace(GOOD, held_ack=resign_ack(ack(), at=10)), "signature"),
    (dataclasses.replace(GOOD, held_ack=resign_ack(ack(), incarnation=INC2)), "signature"),
    (dataclasses.replace(GOOD, lack_heads=dataclasses.replace(heads({S: 4}), incarnation=INC2)),
     "signature"),
    (dataclasses.replace(GOOD, lack_heads=dataclasses.replace(heads({S: 4}), top=9)),
     "signature"),
    (dataclasses.replace(GOOD, lack_heads=dataclasses.replace(
        heads({S: 4}), marks=(Watermark(S, 3),))), "signature"),
    (dataclasses.replace(GOOD, held_ack=ack(at=200)), "not later"),
    (dataclasses.replace(GOOD, held_ack=ack(at=250)), "not later"),
    (dataclasses.replace(GOOD, seq=6), "does not claim"),
    (dataclasses.replace(GOOD, sender=T), "does not claim"),
    (dataclasses.replace(GOOD, lack_heads=heads({S: 5})), "does not deny"),
    (WithholdingProof(S, 5, held_ack=ack(), lack_backfill=backfill({S: 2}, more=True)),
     "does not deny"),
    (WithholdingProof(S, 5, held_ack=ack(), lack_backfill=dataclasses.replace(
        backfill({S: 2}), more=False, entries=(Entry(S, 5, D5),))), "signature"),
])
def test_forged_or_tampered_proofs_are_refused(proof: WithholdingProof, why: str) -> None:
    verify(GOOD)  # the untouched one holds
    with pytest.raises(ProofError, match=why):
        verify(roundtrip(proof))


@pytest.mark.parametrize("lack_in", [
    lambda inc: heads({S: 4}, inc=inc),
    lambda inc: heads({}, probes=(Probe(S, 5, None),), inc=inc),
    lambda inc: backfill({S: 2}, inc=inc),
], ids=["heads-mark", "heads-probe", "backfill"])
def test_statements_of_two_incarnations_prove_nothing(
        lack_in: Callable[[bytes], SignedHeads | SignedBackfill]) -> None:
    """The same pair convicts within one incarnation; when the lack statement is signed by
    another incarnation (the node lost its database in between), it is refused, by name."""
    held = ack()

    def proof(lack: SignedHeads | SignedBackfill) -> WithholdingProof:
        return WithholdingProof(
            S, 5, held_ack=held, lack_heads=lack if isinstance(lack, SignedHeads) else None,
            lack_backfill=lack if isinstance(lack, SignedBackfill) else None)

    assert verify(roundtrip(proof(lack_in(INC)))).seq == 5
    other = lack_in(INC2)
    assert other.valid()
    with pytest.raises(ProofError, match=r"different incarnations .* not withholding"):
        verify(roundtrip(proof(other)))
    assert contradiction(held, other) is None


def test_a_signature_by_another_key_under_the_claimed_node_id_is_refused() -> None:
    forged = dataclasses.replace(ack(key=OTHER), node_id=NODE.public)
    with pytest.raises(ProofError, match="signature"):
        verify(dataclasses.replace(GOOD, held_ack=forged))


def test_a_statement_of_one_kind_cannot_pass_as_another() -> None:
    """Contexts separate the kinds: an ack's signature does not verify as heads."""
    h = heads({S: 4})
    a = ack()
    assert not dataclasses.replace(h, signature=a.signature).valid()


# -- the statement clock ------------------------------------------------------------------------


def test_stamps_rise_strictly_whatever_the_wall_clock_does() -> None:
    clock = StampClock(reserved=0)
    assert clock.next(1_000) is None  # nothing reserved yet
    clock.reserved = clock.wanted(1_000)
    assert clock.reserved == 1_000 + RESERVE_MS
    first = clock.next(1_000)
    second = clock.next(500)  # the wall clock went back
    third = clock.next(500)
    assert first is not None and second is not None and third is not None
    assert first < second < third
    assert clock.next(1_000 + RESERVE_MS + 1) is None  # past the reservation: reserve first
    restarted = StampClock(reserved=clock.reserved)
    restarted.reserved = restarted.wanted(10)
    again = restarted.next(10)  # a restart with the wall clock far back
    assert again is not None and again > clock.reserved


def test_backdated() -> None:
    assert backdated(100, 100) and backdated(100, 50)
    assert not backdated(100, 101) and not backdated(None, 0)


# -- a real syncnode's statements ---------------------------------------------------------------


async def test_an_honest_syncnode_never_contradicts_itself(
        cluster: MemoryCluster) -> None:  # noqa: F811
    """Acks, heads and backfill answers of a real node, with a gap in what it holds (seq 2
    missing: its ack of 3 and a watermark of 1 do not contradict), then a restart with its
    wall clock an hour back: later statements still stamp later, and nothing proves
    anything against it."""
    alice = Device("alice")
    node = cluster.nodes[0]
    g = new_group(alice, [node.entry])
    statements: list[SignedAck | SignedHeads | SignedBackfill] = []
    async with cluster.clients(alice, [node]) as (c,):
        await c.register_group(g.values[0])
        for seq in (1, 3):
            env = seal(alice, g, seq, 0)
            st = await c.store(env)
            a = ack_of(node.key.public, st)
            assert a.valid() and a.digest == env.digest()
            statements.append(a)
        h = await c.holdings(g.group_id, [alice.key_fpr], [(alice.key_fpr, 3),
                                                            (alice.key_fpr, 2)])
        assert h.valid() and h.mark(alice.key_fpr) == 1
        assert h.probe(alice.key_fpr, 3) == Probe(alice.key_fpr, 3, statements[1].digest)
        assert h.probe(alice.key_fpr, 2) == Probe(alice.key_fpr, 2, None)
        statements.append(h)
        page = await c.backfill(g.group_id, {})
        b = backfill_of(node.key.public, g.group_id, {}, page)
        assert b.valid() and not b.more and len(b.entries) == 2
        statements.append(b)
    await cluster.stop_node(node)
    restarted = await cluster.start_node(node.key)
    restarted.service.clock = lambda: 1_000.0  # 1970: far behind the stamps it issued
    restarted.service.notary.clock = restarted.service.clock
    async with cluster.clients(alice, [restarted]) as (c,):
        st = await c.store(seal(alice, g, 2, 0))
        later = ack_of(node.key.public, st)
        assert later.valid() and later.at > max(s.at for s in statements)
        assert {s.incarnation for s in statements} == {later.incarnation}  # one life
        h2 = await c.holdings(g.group_id, [alice.key_fpr], [(alice.key_fpr, 3)])
        assert h2.at > later.at and h2.mark(alice.key_fpr) == 3
        statements += [later, h2]
    for held in statements:
        for lack in statements:
            if isinstance(held, (SignedAck, SignedHeads)) and isinstance(
                    lack, (SignedHeads, SignedBackfill)):
                assert contradiction(held, lack) is None, (held, lack)


async def test_a_withholding_syncnode_signs_its_own_conviction(
        cluster: MemoryCluster) -> None:  # noqa: F811
    """The simulator's withholder: it acks, then signs heads that hold nothing."""
    alice = Device("alice")
    node = await cluster.start_node(service_class=WithholdingService)
    g = new_group(alice, [node.entry])
    async with cluster.clients(alice, [node]) as (c,):
        await c.register_group(g.values[0])
        st = await c.store(seal(alice, g, 1, 0))
        a = ack_of(node.key.public, st)
        h = await c.holdings(g.group_id, [alice.key_fpr], [(alice.key_fpr, 1)])
    proof = contradiction(a, h)
    assert proof is not None
    assert verify(roundtrip(proof)).node_id == node.key.public


async def test_a_syncnode_that_lost_its_database_signs_under_a_new_incarnation(
        cluster: MemoryCluster) -> None:  # noqa: F811
    """Its data deleted, restarted with the same key: it honestly lacks what it acked, and
    its wall clock is behind the stamps it issued (the reservation went with the data). Its
    statements name a new incarnation, so the pair proves no withholding; it proves a reset."""
    alice = Device("alice")
    node = cluster.nodes[0]
    g = new_group(alice, [node.entry])
    async with cluster.clients(alice, [node]) as (c,):
        await c.register_group(g.values[0])
        before = ack_of(node.key.public, await c.store(seal(alice, g, 1, 0)))
    await cluster.stop_node(node)
    for p in node.path.parent.glob(node.path.name + "*"):
        p.unlink()
    wiped = await cluster.start_node(node.key)
    async with cluster.clients(alice, [wiped]) as (c,):
        await c.register_group(g.values[0])
        after = await c.holdings(g.group_id, [alice.key_fpr], [(alice.key_fpr, 1)])
    assert after.valid() and after.mark(alice.key_fpr) == 0
    assert after.probe(alice.key_fpr, 1) == Probe(alice.key_fpr, 1, None)
    assert after.incarnation != before.incarnation
    assert contradiction(before, after) is None
    with pytest.raises(ProofError, match="different incarnations"):
        verify(WithholdingProof(alice.key_fpr, 1, held_ack=before, lack_heads=after))
    evidence = reset_between(before, after)
    assert evidence is not None
    shown = verify_reset(decode_as(encode(evidence), StorageReset))
    assert (shown.node_id, shown.old_incarnation, shown.new_incarnation) == (
        node.key.public, before.incarnation, after.incarnation)


@pytest.mark.parametrize("lack", [
    heads({S: 2}, probes=(Probe(S, 5, None),), covered={S: 6}),
    backfill({S: 0}, (Entry(S, 6, D5),), covered={S: 6}),
], ids=["heads", "backfill"])
def test_what_a_compaction_covers_is_never_a_lack(lack: SignedHeads | SignedBackfill) -> None:
    """A compacted syncnode deleted the envelopes its point covers (their content is in the
    state): an ack of one of them and a later statement naming the coverage prove nothing;
    the same statement without the coverage is a proof (the control)."""
    assert contradiction(ack(), lack) is None
    bare = dataclasses.replace(lack, covered=())
    assert not bare.valid()  # the coverage is signed: it cannot be stripped or added
    if isinstance(lack, SignedHeads):
        resigned = heads({S: 2}, probes=(Probe(S, 5, None),))
    else:
        resigned = backfill({S: 0}, (Entry(S, 6, D5),))
    assert contradiction(ack(), resigned) is not None


async def test_a_compacted_syncnode_never_contradicts_its_acks(
        cluster: MemoryCluster) -> None:  # noqa: F811
    """A real service: acks, then a compaction applied (covered envelopes deleted), then
    heads and a complete backfill answer: nothing that acked contradicts them."""
    alice = Device("alice")
    node = cluster.nodes[0]
    g = new_group(alice, [node.entry])
    async with cluster.clients(alice, [node]) as (c,):
        await c.register_group(g.values[0])
        acks = [ack_of(node.key.public, await c.store(seal(alice, g, seq, 0)))
                for seq in (1, 2, 3)]
        state = await node.service.group(g.group_id)
        assert state is not None
        point = CompactionPoint((Covered(alice.key_fpr, 2),), alice.key_fpr, 2,
                                acks[1].digest, b"h" * 32, b"v").encode()
        await node.service.store.compact_envelopes(g.group_id, point, {alice.key_fpr: 2},
                                                   (alice.key_fpr, 2))
        state.compacted = point  # what syncnode.compaction does once the point is applied
        assert await node.service.store.envelope_count(g.group_id) == 2  # seq 1 is gone
        h = await c.holdings(g.group_id, [alice.key_fpr], [(alice.key_fpr, q) for q in (1, 2, 3)])
        page = await c.backfill(g.group_id, {})
    assert h.covered == (Watermark(alice.key_fpr, 2),) == page.covered
    assert h.probe(alice.key_fpr, 1) == Probe(alice.key_fpr, 1, None)  # deleted, but covered
    b = backfill_of(node.key.public, g.group_id, {}, page)
    assert b.valid() and h.valid() and not b.more
    for a in acks:
        assert a.valid()
        assert contradiction(a, h) is None and contradiction(a, b) is None
    # The control: the same answers without the coverage would convict it.
    assert contradiction(acks[0], dataclasses.replace(h, covered=())) is not None


def test_withholding_above_a_compaction_is_still_found() -> None:
    """A complete answer whose first missing seq is covered must not hide a missing seq
    above the coverage (review finding): heads said 1..10 held, the page from 0 with 1..5
    covered returns 5..8 and not 9 or 10."""
    held = heads({S: 10}, at=100)
    lack = backfill({S: 0}, tuple(Entry(S, q, D5) for q in (5, 6, 7, 8)), covered={S: 5})
    proof = contradiction(held, lack)
    assert proof is not None and proof.seq == 9
    assert verify(proof).seq == 9
