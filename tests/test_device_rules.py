"""The device engine's rules (:mod:`device.rules`), on their own: no trio, no SQLite, no network."""

from __future__ import annotations

from dataclasses import replace

import pytest

from device.gaps import backfill_shows_gap, first_missing, gap_state_due, waiting_for
from device.rules import (
    MAX_FLUSH_BYTES,
    STATE_HEADROOM,
    Backoff,
    Fit,
    PendingAcks,
    Triage,
    address_is_news,
    backfill_again,
    check_plaintext,
    conflicts,
    decision_fit,
    durable_count,
    fits_one_message,
    has_quorum,
    is_durable,
    lacks_something,
    learn_after_sync,
    learn_more,
    learned_enough,
    linked_acceptors,
    nodes_to_locate,
    payload_deps,
    publish_due,
    reusable_proposal,
    slots_to_tell,
    state_request_due,
    status_after,
    take_batch,
    triage,
    watchdog_wait,
)
from proto.envelope import Envelope
from proto.errors import DecodeError
from proto.paxos.quorum import AcceptorSet
from proto.payload import MAX_BODY, Dep, Payload, PayloadKind

GROUP = b"g" * 32
ME, ALICE, BOB = b"m" * 32, b"a" * 32, b"b" * 32
N1, N2, N3, STRANGER = b"1" * 32, b"2" * 32, b"3" * 32, b"x" * 32
THREE = AcceptorSet.of(N1, N2, N3)


def envelope(*, group: bytes = GROUP, sender: bytes = ALICE, seq: int = 1, epoch: int = 1
             ) -> Envelope:
    return Envelope(group, sender, seq, epoch, b"ciphertext", b"s" * 64)


def payload(kind: PayloadKind = PayloadKind.UPDATE, *, sender: bytes = ALICE, seq: int = 1,
            deps: tuple[Dep, ...] = (), backend: str = "loro/1") -> Payload:
    return Payload(kind, sender, seq, deps, backend, b"body")


# -- outbox ---------------------------------------------------------------------------------------


def test_a_batch_takes_the_oldest_edits_that_fit_and_always_one() -> None:
    rows = [(1, b"a" * 400), (2, b"b" * 400), (3, b"c" * 400)]
    assert take_batch(rows, limit=1000) == rows[:2]
    assert take_batch(rows, limit=800) == rows[:2]  # exactly at the limit still fits
    assert take_batch(rows, limit=799) == rows[:1]
    assert take_batch([(7, b"x" * 5000)], limit=1000) == [(7, b"x" * 5000)]  # too big: alone
    assert take_batch([]) == []
    assert take_batch([(i, b"e") for i in range(10)]) == [(i, b"e") for i in range(10)]
    assert MAX_FLUSH_BYTES == 1024 * 1024


def test_payload_deps_leave_our_own_entry_out_except_in_a_state() -> None:
    delivered = {ME: 4, ALICE: 2, BOB: 0}
    mine = Dep(ME, 4)
    for kind in (PayloadKind.UPDATE, PayloadKind.SYNC_REQUEST):
        assert payload_deps(kind, delivered, ME) == (Dep(ALICE, 2),)
    state = payload_deps(PayloadKind.STATE, delivered, ME)
    assert mine in state and Dep(ALICE, 2) in state
    assert all(d.seq > 0 for d in state)  # senders with nothing delivered are left out


def test_a_state_is_sent_only_when_it_fits_one_message_and_when_due() -> None:
    assert fits_one_message(b"x" * (MAX_BODY - STATE_HEADROOM))
    assert not fits_one_message(b"x" * (MAX_BODY - STATE_HEADROOM + 1))
    assert not publish_due(4999, 5000)
    assert publish_due(5000, 5000) and publish_due(5001, 5000)


def test_an_update_is_durable_at_a_quorum_of_the_groups_syncnodes() -> None:
    assert not is_durable({N1}, THREE)
    assert is_durable({N1, N2}, THREE)
    assert not is_durable({N1, STRANGER}, THREE)  # an ack from outside the group does not count
    assert is_durable({N1}, AcceptorSet.of(N1))


def test_pending_acks_settle_each_envelope_once_at_its_quorum() -> None:
    first, second = envelope(sender=ME, seq=1), envelope(sender=ME, seq=2)
    acks = PendingAcks([(2, second)])
    acks.add(first)
    assert len(acks) == 2 and bool(acks)
    assert [o.envelope.seq for o in acks.unacked_by(N1)] == [1, 2]  # in seq order
    out = acks.waiting[1]
    assert not acks.ack(out, N1, THREE)
    assert [o.envelope.seq for o in acks.unacked_by(N1)] == [2]
    assert [o.envelope.seq for o in acks.unacked_by(N2)] == [1, 2]
    assert acks.ack(out, N2, THREE)  # durable now: the caller settles it
    acks.settle(1)
    assert not acks.ack(out, N3, THREE)  # a late ack of a durable envelope changes nothing
    assert list(acks.waiting) == [2]
    assert durable_count(next_seq=3, waiting=len(acks)) == 1


def test_a_reset_syncnode_acks_count_no_more_until_it_acks_again() -> None:
    """A syncnode that lost its storage (a new incarnation) no longer holds what it acked:
    its acks of envelopes not yet durable are forgotten, so they go to it again, and the
    envelope needs a quorum of acks that still hold."""
    first, second = envelope(sender=ME, seq=1), envelope(sender=ME, seq=2)
    acks = PendingAcks([(1, first), (2, second)])
    one, two = acks.waiting[1], acks.waiting[2]
    assert not acks.ack(one, N1, THREE) and not acks.ack(two, N1, THREE)
    assert acks.ack(two, N2, THREE)  # durable already: forgetting N1 does not undo that
    acks.settle(2)
    acks.forget(N1)
    assert [o.envelope.seq for o in acks.unacked_by(N1)] == [1]
    assert not acks.ack(one, N2, THREE)  # N2 alone is no quorum: N1's lost copy no longer counts
    assert acks.ack(one, N1, THREE)  # acked again, by the new incarnation


# -- inbox ----------------------------------------------------------------------------------------


def test_triage_of_received_envelopes() -> None:
    def t(env: Envelope, *, active: bool = True, duplicate: bool = False) -> Triage:
        return triage(env, group_id=GROUP, active=active, epoch=3, joined_epoch=2,
                      duplicate=duplicate)

    assert t(envelope(epoch=3)) is Triage.OPEN
    assert t(envelope(epoch=2)) is Triage.OPEN
    assert t(envelope(epoch=4)) is Triage.FUTURE
    assert t(envelope(epoch=1)) is Triage.TOO_OLD
    assert t(envelope(epoch=3), duplicate=True) is Triage.SKIP
    assert t(envelope(epoch=4), duplicate=True) is Triage.SKIP
    assert t(envelope(group=b"o" * 32)) is Triage.SKIP
    assert t(envelope(), active=False) is Triage.SKIP


def test_a_plaintext_must_match_its_envelope_backend_and_past() -> None:
    env = envelope(sender=ALICE, seq=3)
    check_plaintext(payload(sender=ALICE, seq=3), env, "loro/1", "loro")
    with pytest.raises(DecodeError, match="does not match its envelope"):
        check_plaintext(payload(sender=BOB, seq=3), env, "loro/1", "loro")
    with pytest.raises(DecodeError, match="does not match its envelope"):
        check_plaintext(payload(sender=ALICE, seq=4), env, "loro/1", "loro")
    with pytest.raises(DecodeError, match="in a loro doc"):
        check_plaintext(payload(sender=ALICE, seq=3, backend="other/1"), env, "loro/1", "loro")
    state = payload(PayloadKind.STATE, sender=ALICE, seq=3)
    with pytest.raises(DecodeError, match="cover its sender's past"):
        check_plaintext(state, env, "loro/1", "loro")
    check_plaintext(replace(state, deps=(Dep(ALICE, 2),)), env, "loro/1", "loro")


def test_a_state_request_is_answered_only_when_the_requester_lacks_something() -> None:
    assert not lacks_something({ALICE: 3, BOB: 1}, {ALICE: 3, BOB: 1})
    assert not lacks_something({ALICE: 5}, {ALICE: 3})
    assert lacks_something({ALICE: 2}, {ALICE: 3})
    assert lacks_something({}, {BOB: 1})
    assert not lacks_something({}, {})


def test_state_requests_are_spaced_by_the_interval() -> None:
    assert state_request_due(now=10.0, last=0.0, interval=3.0)
    assert state_request_due(now=3.0, last=0.0, interval=3.0)
    assert not state_request_due(now=2.9, last=0.0, interval=3.0)


# -- membership -----------------------------------------------------------------------------------


def test_decisions_apply_only_in_slot_order() -> None:
    def fit(slot: int, group: bytes = GROUP, active: bool = True) -> Fit:
        return decision_fit(slot, group, ours=GROUP, active=active, epoch=4)

    assert fit(5) is Fit.NEXT
    assert fit(6) is Fit.AHEAD and fit(60) is Fit.AHEAD
    assert fit(4) is Fit.KNOWN and fit(1) is Fit.KNOWN
    assert fit(5, group=b"o" * 32) is Fit.IGNORE
    assert fit(5, active=False) is Fit.IGNORE


def test_a_second_value_for_a_known_slot_conflicts() -> None:
    assert not conflicts(None, b"v")  # a slot we hold no certificate for (the genesis)
    assert not conflicts(b"v", b"v")
    assert conflicts(b"v", b"w")


def test_status_after_a_commit() -> None:
    assert status_after(removed_by_commit=False, still_in_manifest=True) == "active"
    assert status_after(removed_by_commit=True, still_in_manifest=True) == "removed"
    assert status_after(removed_by_commit=False, still_in_manifest=False) == "removed"


def test_a_saved_proposal_is_finished_first_only_for_its_own_slot() -> None:
    assert reusable_proposal((5, b"value"), 5) == b"value"
    assert reusable_proposal((4, b"value"), 5) is None
    assert reusable_proposal(None, 5) is None


def test_learning_before_a_proposal_ends_at_a_quorum_or_when_every_link_ended() -> None:
    assert not learned_enough(learned=1, finished=1, asked=3, quorum=2)
    assert learned_enough(learned=2, finished=2, asked=3, quorum=2)
    assert learned_enough(learned=0, finished=3, asked=3, quorum=2)  # all failed: do not wait
    assert learn_more(progressed=True, epoch=3, top=7)
    assert not learn_more(progressed=True, epoch=7, top=7)
    assert not learn_more(progressed=False, epoch=3, top=7)  # stuck on a decision: stop


# -- links ----------------------------------------------------------------------------------------


def test_quorum_of_links_counts_the_groups_syncnodes_only() -> None:
    assert linked_acceptors([N1, STRANGER], THREE) == 1
    assert not has_quorum([N1, STRANGER], THREE)
    assert has_quorum({N1: None, N3: None}, THREE)  # a dict of links counts its keys
    assert not has_quorum([], THREE)


def test_the_watchdog_drops_a_link_silent_for_the_limit() -> None:
    assert watchdog_wait(stalled=0.0, limit=3.0) == 3.0
    assert watchdog_wait(stalled=1.0, limit=3.0) == 2.0
    assert watchdog_wait(stalled=2.9, limit=3.0) == pytest.approx(3.0 / 8)  # checks again soon
    assert watchdog_wait(stalled=3.0, limit=3.0) is None
    assert watchdog_wait(stalled=30.0, limit=3.0) is None


def test_redial_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(0.2, 1.0)
    assert [b.next() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next() == 0.2


def test_what_to_ask_a_syncnode_for_next() -> None:
    assert list(slots_to_tell(top=2, epoch=5)) == [3, 4, 5]
    assert list(slots_to_tell(top=5, epoch=5)) == []
    assert list(slots_to_tell(top=7, epoch=5)) == []  # it knows more: learn from it instead
    assert learn_after_sync(hidden=False, top=7, epoch=5)
    assert learn_after_sync(hidden=True, top=0, epoch=5)
    assert not learn_after_sync(hidden=False, top=5, epoch=5)
    assert backfill_again(more=True, before={N1: 3}, after={N1: 9})
    assert backfill_again(more=True, before={}, after={N2: 1})
    # a syncnode that claims more but sends none, or only what cannot be delivered yet
    assert not backfill_again(more=True, before={N1: 3}, after={N1: 3})
    assert not backfill_again(more=False, before={N1: 3}, after={N1: 9})


def test_address_records_are_asked_for_while_a_syncnode_is_unlinked() -> None:
    assert nodes_to_locate([N1, N2, N3], via=N1, linked={N1, N2, N3}) is None
    assert nodes_to_locate([N1, N2, N3], via=N1, linked={N1, N2}) == [N2, N3]
    assert nodes_to_locate([N1], via=N1, linked=set()) is None


def test_an_address_record_is_news_when_newer_and_different() -> None:
    addrs = ("10.0.0.1:7700",)
    assert address_is_news(None, 100.0, addrs)
    assert address_is_news((50.0, ("10.0.0.9:7700",)), 100.0, addrs)
    assert not address_is_news((50.0, addrs), 100.0, addrs)  # the same addresses
    assert not address_is_news((100.0, ("10.0.0.9:7700",)), 100.0, addrs)  # not newer
    assert not address_is_news((150.0, ("10.0.0.9:7700",)), 100.0, addrs)


def test_waiting_for_counts_what_causal_delivery_needs_and_nothing_holds() -> None:
    # alice 5 waits for 3 and 4 (2 delivered); 4 is here: only 3 is missing.
    pending = [payload(sender=ALICE, seq=5), payload(sender=ALICE, seq=4)]
    assert waiting_for(pending, {ALICE: 2}) == 1
    # bob 1 depends on alice 7: alice 3 and 6, 7 are missing too (5 and 4 are here).
    pending.append(payload(sender=BOB, seq=1, deps=(Dep(ALICE, 7),)))
    assert waiting_for(pending, {ALICE: 2}) == 3
    assert waiting_for(pending, {ALICE: 7}) == 0  # a state covered them all
    assert waiting_for([], {ALICE: 2}) == 0
    # A made-up dependency far ahead is counted, not enumerated.
    huge = [payload(sender=BOB, seq=1, deps=(Dep(ALICE, 2 ** 60),))]
    assert waiting_for(huge, {}) == 2 ** 60


def test_a_gap_is_asked_about_once_every_syncnode_was_tried_or_after_a_wait() -> None:
    def due(**kw: object) -> bool:
        args: dict[str, object] = dict(missing=1, since=100.0, now=101.0, backfilled={N1},
                                       syncnodes=[N1, N2, N3], wait=30.0, asked=0,
                                       last_ask=0.0, retry=3.0, retry_max=600.0)
        args.update(kw)
        return gap_state_due(**args)  # type: ignore[arg-type]

    assert not due()  # N2 and N3 may still have them
    assert not due(missing=0, backfilled={N1, N2, N3})
    assert not due(since=None, backfilled={N1, N2, N3})
    assert due(backfilled={N1, N2, N3})  # none of them did
    assert due(now=130.0)  # a syncnode is down: asked after the wait anyway
    # Nobody answered: asked again after 3 s, then 6, 12, ... at most every 600 s.
    assert not due(backfilled={N1, N2, N3}, asked=1, last_ask=100.0, now=102.0)
    assert due(backfilled={N1, N2, N3}, asked=1, last_ask=100.0, now=103.0)
    assert not due(backfilled={N1, N2, N3}, asked=3, last_ask=100.0, now=111.0)
    assert due(backfilled={N1, N2, N3}, asked=3, last_ask=100.0, now=112.0)
    assert not due(backfilled={N1, N2, N3}, asked=30, last_ask=100.0, now=699.0)
    assert due(backfilled={N1, N2, N3}, asked=30, last_ask=100.0, now=700.0)
    assert due(backfilled={N1, N2, N3}, asked=10_000, last_ask=100.0, now=700.0)


def test_a_backfill_begun_before_a_gap_proves_it_only_if_it_skipped_the_missing_seq() -> None:
    # Alice's 5 waits for her 4 (3 delivered); bob's 2 waits for alice's 7.
    pending = [payload(seq=5), payload(sender=BOB, seq=2, deps=(Dep(ALICE, 7),))]
    gaps = first_missing(pending, {ALICE: 3, BOB: 1})
    assert gaps == {ALICE: 4}
    assert first_missing([payload(seq=4), payload(seq=5)], {ALICE: 3}) == {}
    assert backfill_shows_gap(gaps, {ALICE: 6, BOB: 2})  # it served 6 and not 4: it lacks 4
    assert not backfill_shows_gap(gaps, {ALICE: 3})  # it stopped below: may have read early
    assert not backfill_shows_gap(gaps, {})
