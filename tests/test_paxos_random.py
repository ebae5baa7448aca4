"""Hypothesis-driven random schedules over many slots, with acceptor-set changes, message loss,
duplication, reordering and acceptor crash-restarts (state reloaded from persisted records).

Complements the exhaustive explorers (one slot, and two slots for the fast path, small
bounds) with long, multi-slot runs that also exercise paths they abstract away (Nacks,
backoff, relayed certificates, a lease whose next slot has another acceptor set, leases
chained over several slots).

Fast path: proposers may ask for leases (AcceptLeased); a ``lease`` step gives a decided
proposer's lease for the next slot to the same device's proposer there, if it has not started
yet, which then starts on the lease (phase 2 at once when it holds a quorum of that slot's
acceptors).
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proto.identity import SecretKey, fingerprint
from proto.paxos import (
    Accepted,
    AcceptedLeased,
    Acceptor,
    AcceptorRecord,
    AcceptorSet,
    Decided,
    EquivocationProof,
    Learner,
    Lost,
    Nack,
    Phase,
    Promise,
    Proposer,
    Reject,
    value_hash,
    verify_certificate,
)

G = b"random-group"
NODES = [SecretKey(bytes([0x30 + i]) * 32) for i in range(5)]
DEVICES = [SecretKey(bytes([0x90 + i]) * 32) for i in range(3)]
MEMBERS = {fingerprint(k.public): k.public for k in DEVICES}
SUBSETS = [frozenset(c) for c in itertools.combinations(range(5), 3)] + [frozenset(range(5))]


class World:
    def __init__(self, sets: list[frozenset[int]], leased: frozenset[int] = frozenset()
                 ) -> None:
        self.sets = [AcceptorSet(frozenset(NODES[i].public for i in s)) for s in sets]
        self.persisted: dict[int, list[AcceptorRecord]] = {i: [] for i in range(5)}
        self.acceptors = {i: self._fresh(i) for i in range(5)}
        self.learner = Learner(self.acceptors_for)
        self.proposers = [
            Proposer(DEVICES[d], G, slot, f"slot{slot}-dev{d}".encode(), self.sets[slot],
                     want_lease=d in leased)
            for slot in range(len(sets)) for d in range(len(DEVICES))
        ]
        self.by_key = {(p.slot, p.fingerprint): p for p in self.proposers}
        self.pool: list[tuple[str, object]] = []  # (destination, message) in flight
        self.node_ids = {NODES[i].public: i for i in range(5)}
        self.leases_used = 0

    def acceptors_for(self, group: bytes, slot: int) -> AcceptorSet | None:
        return self.sets[slot] if group == G and 0 <= slot < len(self.sets) else None

    def _fresh(self, i: int) -> Acceptor:
        return Acceptor.restore(NODES[i], self.acceptors_for, lambda g, s, f: MEMBERS.get(f),
                                self.persisted[i])

    def broadcast(self, msgs: list[object]) -> None:
        for m in msgs:
            for node in self.sets[m.slot].members:  # type: ignore[attr-defined]
                self.pool.append((f"a{self.node_ids[node]}", m))

    def deliver(self, index: int, keep: bool) -> None:
        dest, msg = self.pool[index] if keep else self.pool.pop(index)
        if dest.startswith("a"):
            i = int(dest[1:])
            step = self.acceptors[i].handle(msg)  # type: ignore[arg-type]
            self.persisted[i].extend(step.persist)  # durable before the reply leaves
            reply = step.reply
            assert not isinstance(reply, Reject), reply
            self.pool.append((f"p{reply.slot}:{reply.ballot.proposer.hex()}", reply))
            vote = reply.accepted if isinstance(reply, AcceptedLeased) else reply
            if isinstance(vote, Accepted):
                event = self.learner.on_accepted(vote)
                assert not isinstance(event, EquivocationProof), "agreement violated"
        else:
            slot_s, fpr = dest[1:].split(":")
            p = self.by_key[(int(slot_s), bytes.fromhex(fpr))]
            assert isinstance(msg, Promise | Accepted | AcceptedLeased | Nack)
            self.broadcast(p.receive(msg))  # type: ignore[arg-type]

    def can_lease(self, p: Proposer) -> bool:
        nxt = self.by_key.get((p.slot + 1, p.fingerprint))
        return p.next_lease() is not None and nxt is not None and nxt.round == 0

    def lease(self, p: Proposer) -> None:
        """Hand ``p``'s lease to the same device's proposer of the next slot, which has not
        started: it is replaced by one built with the lease, which starts at once."""
        lease = p.next_lease()
        nxt = self.by_key[(p.slot + 1, p.fingerprint)]
        assert lease is not None
        fresh = Proposer(nxt.key, G, nxt.slot, nxt.own_value, nxt.acceptors, lease=lease,
                         want_lease=nxt.want_lease)
        self.proposers[self.proposers.index(nxt)] = fresh
        self.by_key[(fresh.slot, fresh.fingerprint)] = fresh
        self.broadcast(fresh.start())  # type: ignore[arg-type]
        self.leases_used += 1

    def crash(self, i: int) -> None:
        self.acceptors[i] = self._fresh(i)  # memory lost, persisted records reloaded

    def check(self) -> None:
        for p in self.proposers:
            out = p.outcome
            if isinstance(out, Decided | Lost):
                verify_certificate(out.certificate, self.sets[p.slot])
                learned = self.learner.decided.get((G, p.slot))
                if learned is not None:
                    assert learned.value_hash == out.certificate.value_hash
                if isinstance(out, Decided):
                    assert out.value == p.own_value
                elif out.value is not None:
                    assert value_hash(out.value) == out.certificate.value_hash
                    assert out.value != p.own_value
            assert not isinstance(out, EquivocationProof)


@given(st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_schedules_keep_agreement_and_eventually_decide(data: st.DataObject) -> None:
    n_slots = data.draw(st.integers(2, 5), label="slots")
    sets = [frozenset({0, 1, 2})]
    for _ in range(n_slots - 1):  # the manifest may move the group to other syncnodes
        sets.append(data.draw(st.sampled_from(SUBSETS), label="acceptor set"))
    leased = data.draw(st.frozensets(st.integers(0, len(DEVICES) - 1)), label="leasing devices")
    w = World(sets, leased)
    for p in w.proposers:
        if data.draw(st.booleans(), label="proposer starts early"):
            w.broadcast(p.start())  # type: ignore[arg-type]

    for _ in range(data.draw(st.integers(0, 300), label="steps")):
        action = data.draw(st.sampled_from(["deliver", "deliver", "deliver", "duplicate", "drop",
                                            "crash", "retry", "lease"]))
        if action in ("deliver", "duplicate", "drop") and w.pool:
            i = data.draw(st.integers(0, len(w.pool) - 1))
            if action == "drop":
                w.pool.pop(i)
            else:
                w.deliver(i, keep=action == "duplicate")
        elif action == "crash":
            w.crash(data.draw(st.integers(0, 4)))
        elif action == "retry":
            p = data.draw(st.sampled_from(w.proposers))
            if p.phase is not Phase.DONE and p.round < 20:
                w.broadcast(p.retry())  # type: ignore[arg-type]
        elif action == "lease":
            ready = [p for p in w.proposers if w.can_lease(p)]
            if ready:
                w.lease(data.draw(st.sampled_from(ready)))
        w.check()

    # Heal: faults stop, proposers retry one at a time with reliable FIFO delivery. Every slot
    # must reach a decision that all its proposers and the learner agree on.
    w.pool.clear()
    for i in range(len(w.proposers)):
        before = [q for q in w.proposers if q.slot == w.proposers[i].slot - 1
                  and q.fingerprint == w.proposers[i].fingerprint]
        if before and w.can_lease(before[0]):  # the fast path, when it is there to take
            w.lease(before[0])
            while w.pool:
                w.deliver(0, keep=False)
        p = w.proposers[i]
        for _ in range(10):
            if p.phase is Phase.DONE:
                break
            w.broadcast(p.retry())  # type: ignore[arg-type]
            while w.pool:
                w.deliver(0, keep=False)
        assert p.phase is Phase.DONE
    w.check()
    event(f"fast-path starts: {min(w.leases_used, 3)}{'+' if w.leases_used >= 3 else ''}")

    for slot in range(n_slots):
        assert (G, slot) in w.learner.decided
        winners = {p.outcome.certificate.value_hash for p in w.proposers  # type: ignore[union-attr]
                   if p.slot == slot}
        assert len(winners) == 1
        assert sum(isinstance(p.outcome, Decided) for p in w.proposers if p.slot == slot) == 1
