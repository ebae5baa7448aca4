"""The device's compaction checks (device/compaction_check.py) against real Loro documents,
without a network: a point whose state lacks a covered update is found, whichever comes first
(the update or the point); a state that contradicts its point is found; an honest point
passes; and the pure rules of the trigger and of re-basing a compaction."""

from __future__ import annotations

from device.compaction_check import (
    Finding,
    Ledger,
    compaction_due,
    judge_state,
    state_facts,
    still_advances,
)
from device.crdt_loro import LoroDocument
from proto.compaction import make_point
from proto.payload import pack_updates

A, B = b"\x0a" * 32, b"\x0b" * 32


def _edits(doc: LoroDocument, n: int, tag: str) -> list[bytes]:
    out = []
    for i in range(n):
        u = doc.change(lambda e, k=f"{tag}{i}": e.map("m").insert(k, 1))
        assert u is not None
        out.append(u)
    return out


def _ledger() -> tuple[Ledger, list[Finding]]:
    found: list[Finding] = []
    ledger = Ledger(LoroDocument(99))
    ledger.on_wrong = found.append
    return ledger, found


def test_an_honest_point_passes_both_checks() -> None:
    a, b = LoroDocument(1), LoroDocument(2)
    ups_b = _edits(b, 3, "b")
    a.apply(ups_b)
    ledger, found = _ledger()
    for seq, u in enumerate(ups_b, 1):
        ledger.record_updates(B, seq, [u])
    snap = a.snapshot()
    body = pack_updates([snap])
    point = make_point({B: 3, A: 1}, A, 1, b"\1" * 32, body, a.version_of([snap]))
    ledger.decided(point.encode(), 5)
    assert ledger.checked == 3 and not ledger.records
    ledger.state(state_facts(a, A, 1, {B: 3}, body, snap))
    assert ledger.state_checked and not found


def test_a_state_lacking_a_covered_update_is_found_before_or_after_the_point() -> None:
    a, b = LoroDocument(1), LoroDocument(2)
    ups_b = _edits(b, 4, "b")
    a.apply(ups_b[:2])
    stale = a.snapshot()  # lacks b's 3 and 4, but the point will claim them
    point = make_point({B: 4, A: 1}, A, 1, b"\1" * 32, pack_updates([stale]),
                       a.version_of([stale])).encode()
    early, found_early = _ledger()  # delivered b's updates, then learned the point
    for seq, u in enumerate(ups_b, 1):
        early.record_updates(B, seq, [u])
    early.decided(point, 7)
    late, found_late = _ledger()  # learned the point, then delivered them
    late.decided(point, 7)
    for seq, u in enumerate(ups_b, 1):
        late.record_updates(B, seq, [u])
    for found in (found_early, found_late):
        assert [(f.sender, f.seq, f.slot) for f in found] == [(B, 3, 7), (B, 4, 7)]
        assert "lacks an update" in found[0].reason


def test_a_state_that_contradicts_its_point_is_found() -> None:
    a = LoroDocument(1)
    _edits(a, 2, "a")
    snap = a.snapshot()
    body = pack_updates([snap])
    point = make_point({A: 3}, A, 3, b"\1" * 32, body, a.version_of([snap]))
    includes = a.version_includes
    assert judge_state(point, 1, state_facts(a, A, 3, {A: 2}, body, snap), includes) is None
    other = pack_updates([snap, b"x"])
    assert "hash" in judge_state(point, 1, state_facts(a, A, 3, {A: 2}, other, snap),
                                 includes).reason  # type: ignore[union-attr]
    wrong_vector = judge_state(point, 1, state_facts(a, A, 3, {A: 2, B: 1}, body, snap),
                               includes)
    assert wrong_vector is not None and "another vector" in wrong_vector.reason
    _edits(a, 1, "more")
    bigger = a.snapshot()
    lying = judge_state(point, 1, state_facts(a, A, 3, {A: 2}, body, bigger), includes)
    assert lying is not None and "version" in lying.reason


def test_trigger_and_rebase_rules() -> None:
    assert not compaction_due(9, 10, every=10, every_bytes=0)
    assert compaction_due(10, 0, every=10, every_bytes=0)
    assert compaction_due(0, 64, every=0, every_bytes=64)
    assert not compaction_due(10**9, 10**12, every=0, every_bytes=0)
    ours = make_point({A: 5, B: 3}, A, 5, b"\1" * 32, b"s", b"v")
    assert still_advances(None, ours)
    assert still_advances(make_point({A: 2, B: 3}, A, 2, b"\2" * 32, b"s", b"v").encode(), ours)
    # A point decided meanwhile that covers more of B, or our state's seq already: ours stops.
    assert not still_advances(make_point({B: 4}, B, 4, b"\2" * 32, b"s", b"v").encode(), ours)
    assert not still_advances(make_point({A: 5}, A, 5, b"\2" * 32, b"s", b"v").encode(), ours)
