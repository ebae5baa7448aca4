"""Paxos core by example: acceptor, proposer, learner, certificates, authentication, restart."""

from __future__ import annotations

import dataclasses

import pytest

from proto.codec import decode, encode
from proto.identity import SecretKey, fingerprint
from proto.paxos import (
    Accept,
    Accepted,
    AcceptedLeased,
    AcceptLeased,
    Acceptor,
    AcceptorSet,
    Ballot,
    CertificateError,
    Decided,
    Decision,
    EquivocationProof,
    Learner,
    Lease,
    Lost,
    Nack,
    Phase,
    Prepare,
    Promise,
    Proposer,
    Reject,
    RejectReason,
    verify_certificate,
    verify_equivocation,
)
from proto.paxos.quorum import make_certificate

G = b"group-1"
NODES = [SecretKey(bytes([0x50 + i]) * 32) for i in range(5)]
DEVICES = [SecretKey(bytes([0x70 + i]) * 32) for i in range(3)]
MEMBERS = {fingerprint(k.public): k.public for k in DEVICES[:2]}  # DEVICES[2] is not a member
SET_012 = AcceptorSet.of(*(k.public for k in NODES[:3]))
SET_234 = AcceptorSet.of(*(k.public for k in NODES[2:]))


def acceptors_for(group: bytes, slot: int) -> AcceptorSet | None:
    """Slots 0-4 are served by nodes 0-2; from slot 5 on, the manifest moved to nodes 2-4."""
    if group != G:
        return None
    return SET_012 if slot < 5 else SET_234


def proposer_key_for(group: bytes, slot: int, fpr: bytes) -> bytes | None:
    return MEMBERS.get(fpr)


def acceptor(i: int) -> Acceptor:
    return Acceptor(NODES[i], acceptors_for, proposer_key_for)


def learner() -> Learner:
    return Learner(acceptors_for)


def test_ballots_order_by_round_then_proposer() -> None:
    a, b = fingerprint(DEVICES[0].public), fingerprint(DEVICES[1].public)
    lo, hi = sorted([a, b])
    assert Ballot(1, hi) < Ballot(2, lo)
    assert Ballot(2, lo) < Ballot(2, hi)
    assert Ballot(2, lo) == Ballot(2, lo)
    assert max(Ballot(3, lo), Ballot(1, hi), Ballot(3, hi)) == Ballot(3, hi)


def _run_to_decision(p: Proposer, accs: list[Acceptor]) -> None:
    """Deliver everything reliably until the proposer has an outcome."""
    pending = list(p.start())
    while pending and p.outcome is None:
        msg = pending.pop(0)
        for a in accs:
            step = a.handle(msg)
            pending.extend(p.receive(step.reply))  # type: ignore[arg-type]


def test_happy_path_decides_with_a_verifiable_certificate() -> None:
    accs = [acceptor(i) for i in range(3)]
    p = Proposer(DEVICES[0], G, 0, b"commit-A", SET_012)
    _run_to_decision(p, accs)
    assert isinstance(p.outcome, Decided)
    assert p.outcome.value == b"commit-A"
    verify_certificate(p.outcome.certificate, SET_012)
    # certificates travel on the wire and still verify
    cert = decode(encode(p.outcome.certificate))
    verify_certificate(cert, SET_012)
    assert p.phase is Phase.DONE


def test_every_state_change_is_a_record_to_persist_before_the_reply() -> None:
    a = acceptor(0)
    p = Proposer(DEVICES[0], G, 0, b"v", SET_012)
    (prepare,) = p.start()
    step = a.handle(prepare)
    assert isinstance(step.reply, Promise)
    assert len(step.persist) == 1 and step.persist[0].promised == prepare.ballot
    again = a.handle(prepare)  # duplicate: same promise, nothing new to persist
    assert again.persist == () and again.reply == step.reply
    # reach phase 2 with a second promise
    (accept,) = p.receive(step.reply) + p.receive(acceptor(1).handle(prepare).reply)  # type: ignore[arg-type]
    step = a.handle(accept)
    assert isinstance(step.reply, Accepted)
    assert step.persist[0].accepted is not None and step.persist[0].accepted.value == b"v"


def test_restart_from_records_keeps_promises_and_votes() -> None:
    a = acceptor(0)
    records = []
    p1 = Proposer(DEVICES[0], G, 0, b"v1", SET_012, first_round=5)
    (prep_hi,) = p1.start()
    records.extend(a.handle(prep_hi).persist)
    restarted = Acceptor.restore(NODES[0], acceptors_for, proposer_key_for, records)
    p2 = Proposer(DEVICES[1], G, 0, b"v2", SET_012)
    (prep_lo,) = p2.start()
    reply = restarted.handle(prep_lo).reply
    assert isinstance(reply, Nack) and reply.promised == prep_hi.ballot


def test_proposer_adopts_highest_accepted_value_never_its_own() -> None:
    accs = [acceptor(i) for i in range(3)]
    # P0 gets "v0" accepted by acceptor 0 only (the others never see its Accept)
    p0 = Proposer(DEVICES[0], G, 1, b"v0", SET_012)
    (prep,) = p0.start()
    out = p0.receive(accs[0].handle(prep).reply)  # type: ignore[arg-type]
    out += p0.receive(accs[1].handle(prep).reply)  # type: ignore[arg-type]
    (acc,) = out
    accs[0].handle(acc)
    # P1 runs a higher round through acceptors 0 and 2: must propose v0, not v1
    p1 = Proposer(DEVICES[1], G, 1, b"v1", SET_012, first_round=2)
    (prep1,) = p1.start()
    out1 = p1.receive(accs[2].handle(prep1).reply)  # type: ignore[arg-type]
    out1 += p1.receive(accs[0].handle(prep1).reply)  # type: ignore[arg-type]
    (accept1,) = out1
    assert isinstance(accept1, Accept) and accept1.value == b"v0"
    for a in accs:
        p1.receive(a.handle(accept1).reply)  # type: ignore[arg-type]
    assert isinstance(p1.outcome, Lost) and p1.outcome.value == b"v0"


def test_nack_backs_off_and_retry_uses_a_higher_round() -> None:
    accs = [acceptor(i) for i in range(3)]
    hi = Proposer(DEVICES[0], G, 2, b"hi", SET_012, first_round=7)
    (prep_hi,) = hi.start()
    for a in accs:
        a.handle(prep_hi)
    lo = Proposer(DEVICES[1], G, 2, b"lo", SET_012)
    (prep,) = lo.start()
    for a in accs:
        lo.receive(a.handle(prep).reply)  # type: ignore[arg-type]
    assert lo.wants_retry
    (retry,) = lo.retry()
    assert retry.ballot.round == 8 and hi.ballot < retry.ballot
    _run_to_decision(lo, accs)
    assert isinstance(lo.outcome, Decided)


@pytest.mark.parametrize("case", ["non-member", "bad-signature", "other-slot-signature",
                                  "not-an-acceptor", "unknown-group"])
def test_unauthenticated_requests_are_rejected_and_change_nothing(case: str) -> None:
    a = acceptor(0)
    key, slot, group = DEVICES[0], 0, G
    if case == "non-member":
        key = DEVICES[2]
    p = Proposer(key, group, slot, b"v", SET_012)
    (prep,) = p.start()
    if case == "bad-signature":
        prep = dataclasses.replace(prep, signature=bytes(64))
    if case == "other-slot-signature":
        prep = dataclasses.replace(prep, slot=1)  # signature was made for slot 0
    if case == "not-an-acceptor":
        a = acceptor(4)  # node 4 serves only slots >= 5
    if case == "unknown-group":
        prep = dataclasses.replace(prep, group_id=b"other")
    step = a.handle(prep)
    assert isinstance(step.reply, Reject) and step.persist == ()
    expected = {"non-member": RejectReason.NOT_A_MEMBER,
                "bad-signature": RejectReason.BAD_SIGNATURE,
                "other-slot-signature": RejectReason.BAD_SIGNATURE,
                "not-an-acceptor": RejectReason.NOT_AN_ACCEPTOR,
                "unknown-group": RejectReason.UNKNOWN_SLOT}[case]
    assert step.reply.reason == expected
    assert a.slots == {}


def test_acceptor_set_changes_at_a_slot_boundary() -> None:
    accs = {i: acceptor(i) for i in range(5)}
    p4 = Proposer(DEVICES[0], G, 4, b"last-of-old-set", SET_012)
    _run_to_decision(p4, [accs[0], accs[1], accs[2]])
    p5 = Proposer(DEVICES[0], G, 5, b"first-of-new-set", SET_234)
    (prep,) = p5.start()
    assert isinstance(accs[0].handle(prep).reply, Reject)  # node 0 left the set at slot 5
    _run_to_decision(p5, [accs[2], accs[3], accs[4]])
    assert isinstance(p5.outcome, Decided)
    verify_certificate(p5.outcome.certificate, SET_234)
    with pytest.raises(CertificateError):
        verify_certificate(p5.outcome.certificate, SET_012)  # signers 3, 4 not in the old set
    assert isinstance(p4.outcome, Decided)
    with pytest.raises(CertificateError):
        verify_certificate(p4.outcome.certificate, SET_234)


def _accepted(node: int, slot: int, value_hash: bytes, rnd: int = 1) -> Accepted:
    """An Accepted signed by ``node`` directly (to build certificates by hand)."""
    from proto.codec import encode_struct
    from proto.paxos.messages import ACCEPTED_CTX, AcceptedBody

    ballot = Ballot(rnd, fingerprint(DEVICES[0].public))
    body = AcceptedBody(G, slot, ballot, value_hash)
    sig = NODES[node].sign(ACCEPTED_CTX, encode_struct(body))
    return Accepted(G, slot, ballot, value_hash, NODES[node].public, sig)


def test_learner_needs_a_quorum_of_valid_distinct_signatures() -> None:
    h = bytes(32)
    lrn = learner()
    assert lrn.on_accepted(_accepted(0, 0, h)) is None
    assert lrn.on_accepted(_accepted(0, 0, h)) is None  # duplicate does not count twice
    forged = dataclasses.replace(_accepted(1, 0, h), signature=bytes(64))
    assert lrn.on_accepted(forged) is None
    outsider = _accepted(3, 0, h)  # node 3 is not an acceptor of slot 0
    assert lrn.on_accepted(outsider) is None
    event = lrn.on_accepted(_accepted(2, 0, h))
    assert isinstance(event, Decision)
    verify_certificate(event.certificate, SET_012)
    assert lrn.decided[(G, 0)] == event.certificate


def test_certificate_verification_rejects_every_defect() -> None:
    h = bytes(32)
    votes = {NODES[i].public: _accepted(i, 0, h).signature for i in range(2)}
    good = make_certificate(G, 0, Ballot(1, fingerprint(DEVICES[0].public)), h, votes)
    verify_certificate(good, SET_012)
    short = dataclasses.replace(good, signatures=good.signatures[:1])
    with pytest.raises(CertificateError, match="quorum"):
        verify_certificate(short, SET_012)
    dup = dataclasses.replace(good, signatures=(good.signatures[0], good.signatures[0]))
    with pytest.raises(CertificateError, match="twice"):
        verify_certificate(dup, SET_012)
    other_value = dataclasses.replace(good, value_hash=b"\1" * 32)
    with pytest.raises(CertificateError, match="bad signature"):
        verify_certificate(other_value, SET_012)
    with pytest.raises(CertificateError, match="not an acceptor"):
        verify_certificate(good, SET_234)


def test_single_byzantine_acceptor_cannot_forge_a_certificate() -> None:
    h = b"\7" * 32
    byz = NODES[0]
    real = _accepted(0, 0, h)
    fake = dataclasses.replace(_accepted(0, 0, h), acceptor=NODES[1].public)  # byz's sig as node 1
    cert = make_certificate(G, 0, real.ballot, h,
                            {byz.public: real.signature, NODES[1].public: fake.signature})
    with pytest.raises(CertificateError):
        verify_certificate(cert, SET_012)
    with pytest.raises(CertificateError):
        learner().on_certificate(cert)


def test_conflicting_certificates_give_an_equivocation_proof() -> None:
    ha, hb = b"\xaa" * 32, b"\xbb" * 32
    lrn = learner()
    for i in (0, 1):
        lrn.on_accepted(_accepted(i, 3, ha))
    assert isinstance(lrn.decided.get((G, 3)), object)
    cert_b = make_certificate(G, 3, Ballot(2, fingerprint(DEVICES[0].public)), hb, {
        NODES[i].public: _accepted(i, 3, hb, rnd=2).signature for i in (1, 2)})
    event = lrn.on_certificate(cert_b)
    assert isinstance(event, EquivocationProof)
    verify_equivocation(event, SET_012)
    assert lrn.proofs == [event]
    assert decode(encode(event)) == event  # proofs can be persisted and shown to others
    # the same certificate again is not a new decision
    assert lrn.on_certificate(cert_b) is None or isinstance(lrn.on_certificate(cert_b),
                                                            EquivocationProof)
    with pytest.raises(CertificateError):
        verify_equivocation(EquivocationProof(event.first, event.first), SET_012)


# -- the fast path (leases) ---------------------------------------------------------------------


def _leased(slot: int, value: bytes, accs: list[Acceptor], lease: Lease | None = None,
            acceptors: AcceptorSet = SET_012) -> Proposer:
    p = Proposer(DEVICES[0], G, slot, value, acceptors, lease=lease, want_lease=True)
    _run_to_decision(p, accs)
    return p


def test_a_leased_accept_persists_the_vote_and_the_next_promise_together() -> None:
    accs = [acceptor(i) for i in range(3)]
    p = Proposer(DEVICES[0], G, 1, b"v1", SET_012, want_lease=True)
    (prep,) = p.start()
    (accept,) = p.receive(accs[0].handle(prep).reply) + p.receive(  # type: ignore[arg-type]
        accs[1].handle(prep).reply)  # type: ignore[arg-type]
    assert isinstance(accept, AcceptLeased)
    step = accs[0].handle(accept)
    assert isinstance(step.reply, AcceptedLeased) and step.reply.lease is not None
    assert [(r.slot, r.promised) for r in step.persist] == [(1, p.ballot), (2, p.ballot)]
    assert step.reply.lease.slot == 2 and step.reply.lease.accepted is None
    restarted = Acceptor.restore(NODES[0], acceptors_for, proposer_key_for, step.persist)
    assert restarted.state(G, 2).promised == p.ballot  # the lease survives a restart


def test_the_next_slot_is_decided_with_accept_alone() -> None:
    accs = [acceptor(i) for i in range(3)]
    first = _leased(1, b"v1", accs)
    lease = first.next_lease()
    assert isinstance(first.outcome, Decided) and lease is not None and lease.slot == 2
    second = Proposer(DEVICES[0], G, 2, b"v2", SET_012, lease=lease, want_lease=True)
    (msg,) = second.start()
    assert isinstance(msg, AcceptLeased) and msg.ballot == lease.ballot
    # a retry (timeout, Nack) never reuses the lease's ballot: it is spent
    assert second.clone().retry()[0].ballot.round == lease.ballot.round + 1
    for a in accs:
        second.receive(a.handle(msg).reply)  # type: ignore[arg-type]
    assert isinstance(second.outcome, Decided) and second.outcome.value == b"v2"


def test_no_lease_over_a_higher_promise_or_an_accepted_value() -> None:
    accs = [acceptor(i) for i in range(3)]
    rival = Proposer(DEVICES[1], G, 2, b"r", SET_012, first_round=7)
    (prep,) = rival.start()
    assert isinstance(accs[0].handle(prep).reply, Promise)  # acceptor 0 promised (7, rival)
    first = _leased(1, b"v1", accs)
    lease = first.next_lease()
    assert lease is not None
    assert {q.acceptor for q in lease.promises} == {NODES[1].public, NODES[2].public}
    assert accs[0].state(G, 2).promised == prep.ballot  # never lowered
    # the lease is still a quorum (1 and 2); acceptor 0 Nacks it and the others accept
    second = Proposer(DEVICES[0], G, 2, b"v2", SET_012, lease=lease)
    (msg,) = second.start()
    assert isinstance(accs[0].handle(msg).reply, Nack)


def test_a_lease_that_is_no_quorum_of_the_next_set_falls_back_to_prepare() -> None:
    """Slot 5 moved to nodes 2-4: promises of nodes 0-2 are one of them, not a quorum."""
    accs = [acceptor(i) for i in range(3)]
    first = _leased(4, b"v4", accs)
    lease = first.next_lease()
    assert lease is not None and lease.slot == 5
    second = Proposer(DEVICES[0], G, 5, b"v5", SET_234, lease=lease)
    (msg,) = second.start()
    assert isinstance(msg, Prepare) and msg.ballot.round == lease.ballot.round + 1


def test_a_lease_is_only_for_its_own_slot_and_proposer() -> None:
    accs = [acceptor(i) for i in range(3)]
    lease = _leased(1, b"v1", accs).next_lease()
    assert lease is not None
    wrong_slot = Proposer(DEVICES[0], G, 3, b"x", SET_012, lease=lease)
    assert isinstance(wrong_slot.start()[0], Prepare)
    other = Proposer(DEVICES[1], G, 2, b"x", SET_012, lease=lease)
    assert isinstance(other.start()[0], Prepare)
