"""The engine's decisions, as plain functions and one small sans-IO record: no trio, no SQLite,
no network, so each is unit-tested on its own (``tests/test_device_rules.py``).

The engine modules around them do the I/O and keep the state: :mod:`device.outbox` asks what
goes into an update and when it is durable, :mod:`device.inbox` what to do with an envelope and
whether to answer a state request, :mod:`device.membership` whether a decision applies,
:mod:`device.links` and :mod:`device.session` when a link is dead, how long to wait before
redialling, and what to ask a syncnode for next.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from proto.envelope import Envelope
from proto.errors import DecodeError
from proto.manifest import Manifest, Role, SyncnodeEntry
from proto.paxos.messages import MAX_ACCEPTORS
from proto.paxos.quorum import AcceptorSet
from proto.payload import MAX_BODY, Dep, Payload, PayloadKind, vector_deps

# -- outbox: what goes into an update, when it is durable ---------------------------------------

MAX_FLUSH_BYTES = 1024 * 1024
"""Local edits coalesced into one update: at most this many bytes of them (one edit bigger than
this goes alone)."""

STATE_HEADROOM = 1024
"""Room a whole-document state leaves in :data:`proto.payload.MAX_BODY` for the rest of its
message."""


def take_batch(rows: Sequence[tuple[int, bytes]], limit: int = MAX_FLUSH_BYTES
               ) -> list[tuple[int, bytes]]:
    """The local edits (``(row id, update)``, oldest first) sealed into the next update: the
    oldest ones that fit in ``limit`` bytes, and always at least one."""
    take: list[tuple[int, bytes]] = []
    size = 0
    for rid, data in rows:
        if take and size + len(data) > limit:
            break
        take.append((rid, data))
        size += len(data)
    return take


def payload_deps(kind: PayloadKind, delivered: dict[bytes, int], me: bytes) -> tuple[Dep, ...]:
    """The dependency vector sealed into a payload of ours: everything delivered here. Our own
    entry is left out of edits and state requests (our seqs order them already) and kept in a
    ``STATE``, which must cover its sender's past."""
    return vector_deps(delivered, exclude=None if kind == PayloadKind.STATE else me)


def fits_one_message(body: bytes) -> bool:
    """Whether a whole-document state body fits in one message (else it is not sent: a new
    device then needs a direct transfer)."""
    return len(body) <= MAX_BODY - STATE_HEADROOM


def publish_due(edits_since_state: int, every: int) -> bool:
    """Whether this device stores a whole-document state on the syncnodes now: ``every`` edit
    updates went by with no state seen."""
    return edits_since_state >= every


def is_durable(acks: AbstractSet[bytes], acceptors: AcceptorSet) -> bool:
    """An update is durable once a quorum of the group's syncnodes acknowledged storing it
    (acknowledgements of other nodes do not count)."""
    return len(acks & acceptors.members) >= acceptors.quorum


@dataclass
class Outgoing:
    """One sealed envelope in the outbox and the syncnodes that acknowledged it so far (not
    kept across restarts: resending is harmless)."""

    envelope: Envelope
    acks: set[bytes] = field(default_factory=set)
    commit: int = 1
    """The store commit that sealed it: it leaves once the store synced that far (1: on disk
    when the store opened, synced before the first send)."""


class PendingAcks:
    """The outbox's envelopes not yet durable, by seq (sans-IO: the caller persists)."""

    def __init__(self, envelopes: Iterable[tuple[int, Envelope]] = ()) -> None:
        self.waiting: dict[int, Outgoing] = {seq: Outgoing(env) for seq, env in envelopes}

    def __len__(self) -> int:
        return len(self.waiting)

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def add(self, envelope: Envelope, commit: int = 1) -> None:
        self.waiting[envelope.seq] = Outgoing(envelope, commit=commit)

    def unacked_by(self, node: bytes) -> list[Outgoing]:
        """What to send ``node``: what it has not acknowledged, in seq order."""
        return [out for _seq, out in sorted(self.waiting.items()) if node not in out.acks]

    def ack(self, out: Outgoing, node: bytes, acceptors: AcceptorSet) -> bool:
        """``node`` stored ``out``; True if that made it durable just now (the caller then
        drops it with :meth:`settle`). A late ack of a durable envelope changes nothing."""
        out.acks.add(node)
        return out.envelope.seq in self.waiting and is_durable(out.acks, acceptors)

    def settle(self, seq: int) -> None:
        del self.waiting[seq]

    def forget(self, node: bytes) -> None:
        """``node`` lost its storage (a new incarnation, :mod:`device.witness`): its acks of
        envelopes not yet durable no longer hold, so they are sent to it again."""
        for out in self.waiting.values():
            out.acks.discard(node)


def durable_count(next_seq: int, waiting: int) -> int:
    """How many of our updates are durable: every seq sealed so far but those still waiting."""
    return next_seq - 1 - waiting


# -- inbox: what to do with an envelope, whether to answer a state request ----------------------


class Triage(enum.Enum):
    SKIP = "skip"
    """Another group's, the document is not active, or a duplicate."""
    FUTURE = "future"
    """Of an epoch we have not applied yet: kept until its commit is applied."""
    TOO_OLD = "too-old"
    """Of an epoch before we joined: we cannot decrypt it (a member's state covers it)."""
    OPEN = "open"


def triage(env: Envelope, *, group_id: bytes, active: bool, epoch: int, joined_epoch: int,
           duplicate: bool) -> Triage:
    """What to do with a received envelope before opening it."""
    if env.group_id != group_id or not active or duplicate:
        return Triage.SKIP
    if env.epoch > epoch:
        return Triage.FUTURE
    if env.epoch < joined_epoch:
        return Triage.TOO_OLD
    return Triage.OPEN


def check_plaintext(p: Payload, env: Envelope, backend_id: str, crdt_type: str) -> None:
    """Raise :class:`DecodeError` unless a decrypted payload belongs in this document: it
    repeats its envelope's sender and seq, is of our CRDT backend, and a ``STATE`` covers its
    sender's past."""
    if p.sender != env.sender or p.seq != env.seq:
        raise DecodeError("Payload", "does not match its envelope")
    if p.backend != backend_id:
        raise DecodeError("Payload.backend", f"{p.backend!r} in a {crdt_type} doc")
    if p.kind == PayloadKind.STATE and p.vector().get(p.sender, 0) < p.seq - 1:
        raise DecodeError("Payload.deps", "STATE must cover its sender's past")


def lacks_something(theirs: Mapping[bytes, int], delivered: Mapping[bytes, int]) -> bool:
    """Whether a member whose state request carries vector ``theirs`` lacks something
    delivered here (else it has everything we have: no answer)."""
    return not all(theirs.get(s, 0) >= q for s, q in delivered.items())


def state_request_due(now: float, last: float, interval: float) -> bool:
    """Ask the members for the document state at most once per ``interval``."""
    return not now - last < interval


# -- membership: whether a decision applies ------------------------------------------------------


class Fit(enum.Enum):
    IGNORE = "ignore"
    """Another group's, or the document is not active."""
    KNOWN = "known"
    """A slot we applied: only checked against ours (equivocation)."""
    AHEAD = "ahead"
    """Beyond the next slot: the ones between must be learned first."""
    NEXT = "next"
    """The next slot: verified, then applied."""


def decision_fit(slot: int, group_id: bytes, *, ours: bytes, active: bool, epoch: int) -> Fit:
    """Where a decision for ``slot`` of ``group_id`` stands against our log (decisions apply
    strictly in slot order)."""
    if group_id != ours or not active:
        return Fit.IGNORE
    if slot <= epoch:
        return Fit.KNOWN
    if slot > epoch + 1:
        return Fit.AHEAD
    return Fit.NEXT


def conflicts(known: bytes | None, value: bytes) -> bool:
    """Whether a decision for a slot we applied names another value (to be verified: two
    certified values for one slot are an equivocation)."""
    return known is not None and known != value


def status_after(removed_by_commit: bool, still_in_manifest: bool) -> str:
    """The document's status after applying a commit: ``removed`` when the commit removed
    this device or its manifest no longer names it."""
    return "removed" if removed_by_commit or not still_in_manifest else "active"


def reusable_proposal(stored: tuple[int, bytes] | None, slot: int) -> bytes | None:
    """A commit of ours saved for ``slot`` (from before a restart or a lost round): proposed
    again, first, rather than building a new one."""
    return stored[1] if stored is not None and stored[0] == slot else None


def learned_enough(learned: int, finished: int, asked: int, quorum: int) -> bool:
    """A learn round before proposing ends at a quorum of answers or once every link ended."""
    return learned >= quorum or finished == asked


def learn_more(progressed: bool, epoch: int, top: int) -> bool:
    """Ask a syncnode for its next page of decisions: the last page moved us on and the
    syncnode knows slots beyond our epoch."""
    return progressed and epoch < top


# -- links: when a link is dead, when to redial, what to ask a syncnode for next ----------------


def linked_acceptors(linked: Iterable[bytes], acceptors: AcceptorSet) -> int:
    return sum(n in acceptors for n in linked)


def has_quorum(linked: Iterable[bytes], acceptors: AcceptorSet) -> bool:
    return linked_acceptors(linked, acceptors) >= acceptors.quorum


def watchdog_wait(stalled: float, limit: float) -> float | None:
    """A link whose requests waited ``limit`` s with no reply of any kind is dead (None);
    else how long until it could be."""
    if stalled >= limit:
        return None
    return max(limit - stalled, limit / 8)


class Backoff:
    """How long a link waits before redialling: from ``low``, doubling after each attempt up
    to ``high``; back to ``low`` once a link got as far as its subscription (a syncnode that
    accepts connections and then refuses us is not retried in a tight loop), or when it is
    told to redial (a new address)."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.delay = low

    def reset(self) -> None:
        self.delay = self.low

    def next(self) -> float:
        """The wait before the next dial (the caller adds jitter); doubles the one after."""
        delay = self.delay
        self.delay = min(delay * 2, self.high)
        return delay


def slots_to_tell(top: int, epoch: int) -> range:
    """The decisions a syncnode that knows our log up to ``top`` lacks."""
    return range(top + 1, epoch + 1)


def learn_after_sync(hidden: bool, top: int, epoch: int) -> bool:
    """Read a syncnode's log after bringing it up to date: it knows slots beyond ours, or
    showed us no head (a device removed meanwhile may still read up to its removal)."""
    return hidden or top > epoch


def backfill_again(more: bool, before: Mapping[bytes, int], after: Mapping[bytes, int]) -> bool:
    """Ask for the next backfill page at once: the syncnode has more and this page moved our
    watermarks. A page that moved nothing (empty, or only envelopes of an epoch we have not
    reached, which wait in the inbox) would come back the same: asking again at once spun
    forever in the simulator (seed 5, equivocate: a device cut off on a fork). The periodic
    backfill asks again later, and held envelopes are delivered when the epoch arrives."""
    return more and after != before


def nodes_to_locate(syncnodes: Sequence[bytes], via: bytes, linked: Collection[bytes]
                    ) -> list[bytes] | None:
    """The group's other syncnodes whose address records to ask ``via`` for, while one of
    them is not linked; None when every one is."""
    others = [n for n in syncnodes if n != via]
    return others if any(n not in linked for n in others) else None


def address_is_news(held: tuple[float, tuple[str, ...]] | None, issued_at: float,
                    addrs: tuple[str, ...]) -> bool:
    """Whether a verified address record (``issued_at``, ``addrs``) replaces what this device
    holds for that syncnode (``held``: when it was set and the addresses, or None)."""
    return held is None or not (held[0] >= issued_at or held[1] == addrs)


# -- the document's syncnodes (device.federation) ------------------------------------------------


def named_since(manifests: Sequence[Manifest], node_id: bytes) -> int | None:
    """The slot from which every manifest up to the current one (``manifests[-1]``; index =
    slot) names ``node_id``: the decision an adopting syncnode is given (it verifies the log
    from the genesis up to there, then serves the group). None: the current one does not."""
    slot = None
    for s in range(len(manifests) - 1, -1, -1):
        if node_id not in manifests[s].acceptors():
            break
        slot = s
    return slot


def syncnodes_with(current: Sequence[SyncnodeEntry], entry: SyncnodeEntry
                   ) -> tuple[SyncnodeEntry, ...]:
    """The syncnode set after adding ``entry`` (ValueError says why it cannot be added)."""
    if any(e.node_id == entry.node_id for e in current):
        raise ValueError("that syncnode already serves this document")
    if len(current) >= MAX_ACCEPTORS:
        raise ValueError(f"a document has at most {MAX_ACCEPTORS} syncnodes")
    return (*current, entry)


def syncnodes_without(current: Sequence[SyncnodeEntry], node_id: bytes
                      ) -> tuple[SyncnodeEntry, ...]:
    """The syncnode set after removing ``node_id`` (ValueError says why it cannot be)."""
    kept = tuple(e for e in current if e.node_id != node_id)
    if len(kept) == len(current):
        raise ValueError("that syncnode does not serve this document")
    if not kept:
        raise ValueError("a document needs at least one syncnode; add another one first")
    return kept


def removal_safe(complete: Mapping[bytes, bool], remaining: Collection[bytes]) -> bool:
    """May a syncnode be removed now? ``complete`` holds the answers of the remaining
    syncnodes that were asked whether they hold the group's whole history. Every one must
    have answered yes: a syncnode added shortly before may still lack older updates that are
    on a bare quorum of the old set, the removed one included, and one that cannot be asked
    may be that one. (Conservative: a second dead syncnode blocks removing the first; add a
    new one first.)"""
    return all(complete.get(n, False) for n in remaining)


# -- roles: who may do what, and when a device rotates its own keys -------------------------------


def admin_refusal(manifest: Manifest, me: bytes, what: str) -> str | None:
    """Why this device may not ``what`` (a verb phrase), or None: adds, removes, invites and
    role changes are the admins' (the same rule the syncnodes apply to the commit, checked
    here first so a non-admin fails at once, before any network)."""
    entry = manifest.device(me)
    if entry is not None and entry.role == Role.ADMIN:
        return None
    role = entry.role.name.lower() if entry is not None else "not a member"
    return f"only an admin can {what}; this device is a {role} in this document"


def last_admin(manifest: Manifest, fpr: bytes) -> bool:
    """Whether ``fpr`` is the only admin (it may not be demoted, nor leave while others
    remain)."""
    admins = [d.fingerprint for d in manifest.devices if d.role == Role.ADMIN]
    return admins == [fpr]


def rotation_wait(now: float, last: float, sent: int, *, after: float, after_messages: int
                  ) -> float | None:
    """Seconds until this device should commit a key update of its own leaf (0: now), given
    when its last own commit was (``last``, wall clock) and how many updates it sent since
    (``sent``); None when both thresholds are off (0). Whichever threshold comes first wins;
    a message threshold not reached yet waits on the outbox, not the clock (``inf``)."""
    if after <= 0 and after_messages <= 0:
        return None
    if after_messages > 0 and sent >= after_messages:
        return 0.0
    if after > 0:
        return max(0.0, last + after - now)
    return float("inf")


def rotation_jitter(after: float) -> float:
    """The most a due rotation waits at random first, so members that came online together
    (or share a threshold) do not all propose for the same slot: a tenth of the period, at
    most 30 s, at least 0.1 s."""
    return min(30.0, max(0.1, after / 10)) if after > 0 else 1.0
