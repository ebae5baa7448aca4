"""Checking decided compaction points against what this device holds (no network, no disk).

A compaction point (:mod:`proto.compaction`) claims that one state envelope holds every update
its vector covers. Syncnodes delete those updates on that word, so members check it with what
they have:

* **every covered update we delivered** (or sealed ourselves): the point's CRDT version must
  contain it (:meth:`Ledger.record`; the versions are read from the updates' headers when they
  are applied, :meth:`proto.crdt.CrdtBackend.version_of`). An update delivered after the point
  was decided is checked when it arrives, so a member that was behind still checks.
* **the state itself**, once we decrypted it (:meth:`Ledger.state`): its body hashes to the
  point's ``body_hash``, its payload covers exactly the point's vector, and its CRDT version
  equals the point's ``version`` (each contains the other).

Anything else cannot be checked here (updates we never saw, from before we joined, or that a
state we loaded covered): the point is then taken on the committer's word, which is what the
syncnodes do too. A point is never a reason to drop or skip anything on a device: our own
edits are sent whatever their seq, and nothing local is deleted because of a point. A check
that fails is a :class:`Finding`: the document raises the ``bad-compaction`` alarm with
:class:`proto.compaction.CompactionEvidence` and publishes its own state, so the content the
point lost lives on (:mod:`device.compaction`).

Memory: one version per delivered payload (tens of bytes) since the last decided point
covering it, at most :data:`MAX_RECORDS` per document (the oldest are dropped first, and then
only go unchecked). Records live in memory only: after a restart, updates delivered before it
are not checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proto.compaction import CompactionPoint, Covered, body_hash, covers, decode_point
from proto.crdt import CrdtBackend, CrdtError
from proto.identity import short_id
from proto.logs import get_logger

log = get_logger("device.document")

MAX_RECORDS = 200_000
"""Versions of delivered payloads kept per document for checking points."""


@dataclass(frozen=True)
class StateFacts:
    """What a decrypted STATE payload really is."""

    sender: bytes
    seq: int
    vector: dict[bytes, int]
    """The payload's dependency vector with its own ``(sender, seq)``."""
    body_hash: bytes
    version: bytes


@dataclass(frozen=True)
class Finding:
    """A decided point proven wrong: ``reason``, and the update or state concerned."""

    slot: int
    reason: str
    sender: bytes
    seq: int
    observed_version: bytes
    observed_vector: tuple[Covered, ...] = ()
    observed_body_hash: bytes | None = None


def compaction_due(payloads: int, size: int, *, every: int, every_bytes: int) -> bool:
    """Whether the automatic trigger fires: ``payloads`` delivered or sealed (``size`` bytes
    of CRDT updates) since the last decided point reached a threshold (0: that one is off)."""
    return (every > 0 and payloads >= every) or (every_bytes > 0 and size >= every_bytes)


def still_advances(current_raw: bytes | None, ours: CompactionPoint) -> bool:
    """Whether our point may still follow the group's current one (the manifest rule,
    :func:`proto.compaction.check_transition`); if not, a point decided since we sealed our
    state covers something ours lacks, and ours is dropped (the next trigger seals anew)."""
    current = decode_point(current_raw)
    if current is None:
        return True
    return covers(ours.vector(), current.vector()) and \
        ours.state_seq > current.vector().get(ours.state_sender, 0)


def state_facts(crdt: CrdtBackend, sender: bytes, seq: int, deps: dict[bytes, int],
                body: bytes, snapshot: bytes) -> StateFacts:
    return StateFacts(sender, seq, {**deps, sender: seq}, body_hash(body),
                      crdt.version_of([snapshot]))


def judge_state(point: CompactionPoint, slot: int, facts: StateFacts,
                includes: Callable[[bytes, bytes], bool]) -> Finding | None:
    """The point against its decrypted state (pure)."""
    def wrong(reason: str) -> Finding:
        vector = tuple(Covered(s, q) for s, q in sorted(facts.vector.items()))
        return Finding(slot, reason, facts.sender, facts.seq, facts.version, vector,
                       facts.body_hash)

    if facts.body_hash != point.body_hash:
        return wrong("the state's body does not match the point's hash")
    if facts.vector != point.vector():
        return wrong("the state covers another vector than the point claims")
    if not (includes(facts.version, point.version) and includes(point.version, facts.version)):
        return wrong("the state's CRDT version is not the point's")
    return None


class Ledger:
    """One document's records for checking compaction points (see the module doc)."""

    def __init__(self, crdt: CrdtBackend) -> None:
        self.crdt = crdt
        self.records: dict[tuple[bytes, int], bytes] = {}
        self.states: dict[tuple[bytes, int], StateFacts] = {}
        """Facts of recent STATE payloads (a point is usually decided after its state was
        delivered), at most :data:`MAX_STATES`."""
        self.point: CompactionPoint | None = None
        self.slot = 0
        self.raw: bytes | None = None
        self.state_checked = False
        self.checked = 0
        """Updates checked against a point (for status and tests)."""
        self.findings = 0
        """Checks that failed (each raised the alarm)."""
        self.since_point = 0
        self.bytes_since_point = 0
        """Payloads and CRDT bytes delivered or sealed since the last decided point (the
        automatic trigger's counters, :mod:`device.compaction`)."""
        self.on_wrong: Callable[[Finding], None] = lambda f: None
        self.on_record: Callable[[], None] = lambda: None

    def _includes(self, big: bytes, small: bytes) -> bool:
        try:
            return self.crdt.version_includes(big, small)
        except CrdtError:
            return False

    def record(self, sender: bytes, seq: int, version: bytes, size: int = 0) -> None:
        """A payload of ``sender`` was delivered (or sealed by us) with this version."""
        self.since_point += 1
        self.bytes_since_point += size
        self.on_record()
        p = self.point
        if p is not None and seq <= p.vector().get(sender, 0):
            self._check(sender, seq, version)  # covered: check it now, keep nothing
            return
        if len(self.records) >= MAX_RECORDS:
            del self.records[next(iter(self.records))]
        self.records[(sender, seq)] = version

    def record_updates(self, sender: bytes, seq: int, updates: list[bytes]) -> None:
        try:
            version = self.crdt.version_of(updates)
        except CrdtError:
            return  # applied fine, but its header is unreadable: it goes unchecked
        self.record(sender, seq, version, sum(len(u) for u in updates))

    def state(self, facts: StateFacts) -> None:
        """A STATE payload was delivered (or sealed by us)."""
        self.record(facts.sender, facts.seq, facts.version)
        if len(self.states) >= MAX_STATES:
            del self.states[next(iter(self.states))]
        self.states[(facts.sender, facts.seq)] = facts
        self._check_state()

    def decided(self, raw: bytes | None, slot: int) -> None:
        """The manifest decided at ``slot`` carries ``raw`` as the group's point."""
        if raw == self.raw or raw is None:
            return
        point = decode_point(raw)  # the manifest rules decoded it already
        assert point is not None
        self.point, self.slot, self.raw, self.state_checked = point, slot, raw, False
        self.since_point = self.bytes_since_point = 0
        covered = point.vector()
        for key in [k for k in self.records if k[1] <= covered.get(k[0], 0)]:
            self._check(key[0], key[1], self.records.pop(key))
        self._check_state()

    def _check(self, sender: bytes, seq: int, version: bytes) -> None:
        p = self.point
        assert p is not None
        self.checked += 1
        if not self._includes(p.version, version):
            self.findings += 1
            self.on_wrong(Finding(self.slot, "the compacted state lacks an update it covers",
                                  sender, seq, version))

    def _check_state(self) -> None:
        p = self.point
        if p is None or self.state_checked:
            return
        facts = self.states.get((p.state_sender, p.state_seq))
        if facts is None:
            return
        self.state_checked = True
        finding = judge_state(p, self.slot, facts, self._includes)
        if finding is not None:
            self.findings += 1
            self.on_wrong(finding)
        else:
            log.info("compaction point checked against its state", slot=self.slot,
                     state_sender=short_id(p.state_sender), checked=self.checked)

    def load(self, raw: bytes | None, slot: int) -> None:
        """The point in force when the document is opened (nothing recorded yet to check)."""
        self.decided(raw, slot)


MAX_STATES = 16
"""STATE payloads whose facts are kept (the newest)."""
