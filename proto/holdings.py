"""What a syncnode holds, in statements it signs, and proofs that it withheld (issue 17).

A syncnode is trusted for availability only, so it can *withhold*: store and acknowledge an
update and then not serve it. To make that provable rather than merely visible, a syncnode signs
three kinds of statement with its node key (the key that is its node id), each naming the
**incarnation** of its storage and stamped with its **statement clock** ``at`` (milliseconds;
both below):

* **ack** (:class:`SignedAck`, inside every ``Stored`` reply): "I durably hold envelope
  ``(group, sender, seq)`` with this digest". Signed *after* the write is durable.
* **heads** (:class:`SignedHeads`, the answer to :class:`FetchHoldings`): the group's decided
  top slot; per asked sender the contiguous watermark ``m`` ("I hold seqs ``1..m`` and **not**
  ``m+1``"); and per probed ``(sender, seq)`` the digest held, or none ("I do not hold it").
  Stamped *before* storage is read.
* **backfill** (:class:`SignedBackfill`, every ``BackfillPage``): the request's watermarks,
  the ``(sender, seq, digest)`` of every envelope returned, and ``more``. A complete answer
  (``more`` false) says "I hold nothing else above these watermarks". Stamped before reading.

Each statement is a **held** claim or a **lack** claim about ``(sender, seq)``:

* held: an ack of it; heads whose watermark of the sender reaches ``seq``; heads that probed it
  and show its digest;
* lack: heads whose watermark of the sender is exactly ``seq - 1``; heads that probed it and
  show no digest (or another digest than the held claim's); a complete backfill answer whose
  request watermark of the sender is below ``seq`` and that does not return it.

An honest syncnode never deletes an envelope of a group it serves, except those a decided
compaction covers: heads and backfill answers name the covered vector of the compaction the
node applied (read after the envelopes, so it covers whatever the read missed), and nothing it
covers counts as a lack. A dishonest node may claim more coverage than was decided; that claim
is signed, but checking it against the group's decided point is not built yet (SECURITY.md).
Within one incarnation the statement clock strictly increases, also across restarts. So an
honest node never signs, in one incarnation, a held claim at ``t1`` and a lack claim for the
same envelope at ``t2 > t1``: a :class:`WithholdingProof` holding such a pair convicts the
node whose key signed both, and :func:`verify` checks it with nothing but the statements themselves.

**Incarnation.** 16 random bytes a syncnode's database makes when it is created and keeps
(:meth:`syncnode.storage.Storage.incarnation`). A node whose data directory is lost and that
restarts with the same key (anti-entropy then refills it, :mod:`syncnode.reconcile`) honestly
lacks what it acked before, and its statement clock starts over with its reservation; but its
new database has a new incarnation, and :func:`verify` refuses a pair of statements from two
incarnations. A new incarnation does not let a node escape a proof about the old one: two
statements of one incarnation that contradict each other stay a proof whatever the node signs
later. What a node can do is *forget* everything, but only publicly: a device that sees a new
incarnation raises a ``syncnode-reset`` alarm carrying both signed statements (a
:class:`proto.resets.StorageReset`, which anyone can check) and checks on within the new one
(:mod:`device.witness`). A node that resets often is unreliable, and that is what its users
are told.

**Statement clock.** ``at`` is the node's wall clock in milliseconds, but never lower than one
past the last stamp it issued, also across restarts (not across a lost database: its
reservation is lost with it, another reason for the incarnation): :mod:`proto.stampclock`.

Bounds: a heads answer covers at most :data:`MAX_HOLDING_SENDERS` senders and
:data:`MAX_PROBES` probes (the device asks about itself and at most 255 other senders;
senders beyond that are not covered by its heads checks); a backfill statement is as
large as its request and page (4096 watermarks, 1024 entries). A proof is two statements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from proto.codec import U64, Hash32, MaxItems, PublicKey, Signature64, encode_struct, message
from proto.errors import SyncnodeError
from proto.identity import is_valid_signature, register_context, short_id
from proto.paxos.messages import GroupId
from proto.service import MAX_COVERED_SENDERS, MAX_PAGE, Incarnation, Watermark

ACK_CTX = register_context("syncnode/holdings/ack/v1")
HEADS_CTX = register_context("syncnode/holdings/heads/v1")
BACKFILL_CTX = register_context("syncnode/holdings/backfill/v1")

MAX_HOLDING_SENDERS = 256
"""Senders one heads statement covers (a device asks about itself first)."""
MAX_PROBES = 64
"""``(sender, seq)`` pairs one heads statement answers for."""
MAX_COVERED = MAX_COVERED_SENDERS
"""Senders a statement's ``covered`` vector names (:data:`proto.compaction.MAX_SENDERS`)."""
MAX_BACKFILL_MARKS = 4096
"""The request's watermarks (the bound of :class:`proto.service.Backfill`)."""


class ProofError(SyncnodeError):
    """A withholding proof that does not hold up (forged, tampered, or no contradiction)."""


# -- statements --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AckBody:
    node_id: PublicKey
    incarnation: Incarnation
    group_id: GroupId
    sender: Hash32
    seq: U64
    digest: Hash32
    at: U64


@dataclass(frozen=True)
class SignedAck:
    node_id: PublicKey
    incarnation: Incarnation
    group_id: GroupId
    sender: Hash32
    seq: U64
    digest: Hash32
    at: U64
    signature: Signature64

    def body(self) -> AckBody:
        return AckBody(self.node_id, self.incarnation, self.group_id, self.sender, self.seq,
                       self.digest, self.at)

    def valid(self) -> bool:
        return is_valid_signature(self.node_id, ACK_CTX, encode_struct(self.body()),
                                  self.signature)


@dataclass(frozen=True)
class Probe:
    sender: Hash32
    seq: U64
    digest: Hash32 | None
    """The digest of the envelope held under ``(sender, seq)``; None: none is held."""


@dataclass(frozen=True)
class HeadsBody:
    node_id: PublicKey
    incarnation: Incarnation
    group_id: GroupId
    top: U64
    marks: Annotated[tuple[Watermark, ...], MaxItems(MAX_HOLDING_SENDERS)]
    probes: Annotated[tuple[Probe, ...], MaxItems(MAX_PROBES)]
    at: U64
    covered: Annotated[tuple[Watermark, ...], MaxItems(MAX_COVERED)] = ()


@dataclass(frozen=True)
class SignedHeads:
    node_id: PublicKey
    incarnation: Incarnation
    group_id: GroupId
    top: U64
    marks: Annotated[tuple[Watermark, ...], MaxItems(MAX_HOLDING_SENDERS)]
    probes: Annotated[tuple[Probe, ...], MaxItems(MAX_PROBES)]
    at: U64
    signature: Signature64
    covered: Annotated[tuple[Watermark, ...], MaxItems(MAX_COVERED)] = ()
    """Per sender, the seqs ``1..seq`` the compaction this node applied covers (deleted but
    in the state): never a lack (see the module doc)."""

    def body(self) -> HeadsBody:
        return HeadsBody(self.node_id, self.incarnation, self.group_id, self.top, self.marks,
                         self.probes, self.at, self.covered)

    def valid(self) -> bool:
        return is_valid_signature(self.node_id, HEADS_CTX, encode_struct(self.body()),
                                  self.signature)

    def mark(self, sender: bytes) -> int | None:
        return next((w.seq for w in self.marks if w.sender == sender), None)

    def probe(self, sender: bytes, seq: int) -> Probe | None:
        return next((p for p in self.probes if p.sender == sender and p.seq == seq), None)


@dataclass(frozen=True)
class Entry:
    sender: Hash32
    seq: U64
    digest: Hash32


@dataclass(frozen=True)
class BackfillBody:
    node_id: PublicKey
    incarnation: Incarnation
    group_id: GroupId
    watermarks: Annotated[tuple[Watermark, ...], MaxItems(MAX_BACKFILL_MARKS)]
    entries: Annotated[tuple[Entry, ...], MaxItems(MAX_PAGE)]
    more: bool
    at: U64
    covered: Annotated[tuple[Watermark, ...], MaxItems(MAX_COVERED)] = ()


@dataclass(frozen=True)
class SignedBackfill:
    node_id: PublicKey
    incarnation: Incarnation
    group_id: GroupId
    watermarks: Annotated[tuple[Watermark, ...], MaxItems(MAX_BACKFILL_MARKS)]
    entries: Annotated[tuple[Entry, ...], MaxItems(MAX_PAGE)]
    more: bool
    at: U64
    signature: Signature64
    covered: Annotated[tuple[Watermark, ...], MaxItems(MAX_COVERED)] = ()
    """As :attr:`SignedHeads.covered`."""

    def body(self) -> BackfillBody:
        return BackfillBody(self.node_id, self.incarnation, self.group_id, self.watermarks,
                            self.entries, self.more, self.at, self.covered)

    def valid(self) -> bool:
        return is_valid_signature(self.node_id, BACKFILL_CTX, encode_struct(self.body()),
                                  self.signature)

    def mark(self, sender: bytes) -> int:
        """The request's watermark of ``sender`` (0: not listed, everything was asked)."""
        return next((w.seq for w in self.watermarks if w.sender == sender), 0)


Statement = SignedAck | SignedHeads | SignedBackfill


# -- the request and its answer -----------------------------------------------------------------


@message(0x60)
@dataclass(frozen=True)
class FetchHoldings:
    """Ask a syncnode for its signed heads of a group: the watermark of each of ``senders``
    and the digest it holds (or none) for each of ``probes``. Members and the group's own
    syncnodes only (like ``FetchHeads``)."""

    group_id: GroupId
    senders: Annotated[tuple[Hash32, ...], MaxItems(MAX_HOLDING_SENDERS)]
    probes: Annotated[tuple[Watermark, ...], MaxItems(MAX_PROBES)]


@message(0x61)
@dataclass(frozen=True)
class Holdings:
    heads: SignedHeads


@message(0x62)
@dataclass(frozen=True)
class WithholdingProof:
    """One syncnode signed that it held envelope ``(sender, seq)`` (``held_*``, exactly one
    set) and, later by its own statement clock, that it did not (``lack_*``, exactly one
    set). :func:`verify` checks it with nothing else."""

    sender: Hash32
    seq: U64
    held_ack: SignedAck | None = None
    held_heads: SignedHeads | None = None
    lack_heads: SignedHeads | None = None
    lack_backfill: SignedBackfill | None = None

    @property
    def held(self) -> SignedAck | SignedHeads | None:
        return self.held_ack if self.held_ack is not None else self.held_heads

    @property
    def lack(self) -> SignedHeads | SignedBackfill | None:
        return self.lack_heads if self.lack_heads is not None else self.lack_backfill


# -- claims ------------------------------------------------------------------------------------


def held_digest(st: Statement, sender: bytes, seq: int) -> tuple[bool, bytes | None]:
    """Whether ``st`` claims the node holds ``(sender, seq)``, and the digest if it says."""
    if isinstance(st, SignedAck):
        ok = st.sender == sender and st.seq == seq
        return ok, st.digest if ok else None
    if isinstance(st, SignedHeads):
        probe = st.probe(sender, seq)
        if probe is not None and probe.digest is not None:
            return True, probe.digest
        mark = st.mark(sender)
        return mark is not None and seq <= mark, None
    entry = next((e for e in st.entries if e.sender == sender and e.seq == seq), None)
    return entry is not None, entry.digest if entry else None


def covered_by(st: SignedHeads | SignedBackfill, sender: bytes) -> int:
    """The seqs of ``sender`` the statement says its node's applied compaction covers."""
    return next((w.seq for w in st.covered if w.sender == sender), 0)


def lacks(st: Statement, sender: bytes, seq: int, digest: bytes | None) -> bool:
    """Whether ``st`` claims the node does not hold ``(sender, seq)`` (the envelope of
    ``digest``, when given). An envelope the node's compaction covers is not lacking: its
    content is in the state, and deleting it is what compaction is for."""
    if isinstance(st, SignedAck):
        return False
    if seq <= covered_by(st, sender):
        return False
    if isinstance(st, SignedHeads):
        probe = st.probe(sender, seq)
        if probe is not None and (probe.digest is None
                                  or (digest is not None and probe.digest != digest)):
            return True
        return st.mark(sender) == seq - 1
    if st.more or st.mark(sender) >= seq:
        return False
    entry = next((e for e in st.entries if e.sender == sender and e.seq == seq), None)
    return entry is None or (digest is not None and entry.digest != digest)


@dataclass(frozen=True)
class Finding:
    """What a valid proof shows."""

    node_id: bytes
    group_id: bytes
    sender: bytes
    seq: int
    held_at: int
    lack_at: int
    held_kind: str
    lack_kind: str

    def describe(self) -> str:
        return (f"syncnode {self.node_id.hex()} signed ({self.held_kind}, at {self.held_at} ms) "
                f"that it held update {self.seq} of sender {short_id(self.sender)} in group "
                f"{short_id(self.group_id)}, and later ({self.lack_kind}, at {self.lack_at} ms) "
                f"that it did not")


def _kind(st: Statement) -> str:
    return {SignedAck: "ack", SignedHeads: "heads", SignedBackfill: "backfill answer"}[type(st)]


def verify(proof: WithholdingProof) -> Finding:
    """The finding a proof establishes, or :class:`ProofError`. Needs nothing but the proof:
    both statements must be signed by the node id they carry, and it must be the same one, in
    the same incarnation (a node that lost its storage in between is not withholding)."""
    held_count = (proof.held_ack is not None) + (proof.held_heads is not None)
    lack_count = (proof.lack_heads is not None) + (proof.lack_backfill is not None)
    held, lack = proof.held, proof.lack
    if held_count != 1 or lack_count != 1 or held is None or lack is None:
        raise ProofError("a proof holds exactly one held and one lack statement")
    if held.node_id != lack.node_id:
        raise ProofError("the statements are signed by different syncnodes")
    if held.group_id != lack.group_id:
        raise ProofError("the statements are about different groups")
    if not held.valid():
        raise ProofError("the held statement's signature does not verify")
    if not lack.valid():
        raise ProofError("the lack statement's signature does not verify")
    if held.incarnation != lack.incarnation:
        raise ProofError("the statements come from different incarnations of the node's "
                         "storage: it lost its data in between, which is not withholding")
    if held.at >= lack.at:
        raise ProofError("the lack statement is not later than the held one")
    ok, digest = held_digest(held, proof.sender, proof.seq)
    if not ok:
        raise ProofError("the held statement does not claim that update")
    if not lacks(lack, proof.sender, proof.seq, digest):
        raise ProofError("the lack statement does not deny that update")
    return Finding(held.node_id, held.group_id, proof.sender, proof.seq, held.at, lack.at,
                   _kind(held), _kind(lack))


# -- finding contradictions (the device's side) -------------------------------------------------


def _candidates(held: SignedAck | SignedHeads, lack: Statement) -> list[tuple[bytes, int]]:
    """The ``(sender, seq)`` pairs worth testing: a bounded handful per pair of statements."""
    if isinstance(held, SignedAck):
        return [(held.sender, held.seq)]
    out = [(p.sender, p.seq) for p in held.probes if p.digest is not None]
    for w in held.marks:
        if w.seq < 1:
            continue
        if isinstance(lack, SignedHeads):
            m = lack.mark(w.sender)
            if m is not None and max(m, covered_by(lack, w.sender)) < w.seq:
                out.append((w.sender, max(m, covered_by(lack, w.sender)) + 1))
            out += [(p.sender, p.seq) for p in lack.probes
                    if p.sender == w.sender and p.seq <= w.seq]
        elif isinstance(lack, SignedBackfill) and not lack.more:
            # Covered seqs are never a lack: the first missing seq above them is the one
            start = max(lack.mark(w.sender), covered_by(lack, w.sender))
            got = {e.seq for e in lack.entries if e.sender == w.sender}
            missing = next((q for q in range(start + 1, w.seq + 1) if q not in got), None)
            if missing is not None:
                out.append((w.sender, missing))
    return out


def contradiction(held: SignedAck | SignedHeads, lack: SignedHeads | SignedBackfill
                  ) -> WithholdingProof | None:
    """A proof from two (already verified) statements of one node, if they contradict."""
    if (held.node_id != lack.node_id or held.incarnation != lack.incarnation
            or held.group_id != lack.group_id or held.at >= lack.at):
        return None
    for sender, seq in _candidates(held, lack):
        ok, digest = held_digest(held, sender, seq)
        if ok and lacks(lack, sender, seq, digest):
            return WithholdingProof(
                sender, seq,
                held_ack=held if isinstance(held, SignedAck) else None,
                held_heads=held if isinstance(held, SignedHeads) else None,
                lack_heads=lack if isinstance(lack, SignedHeads) else None,
                lack_backfill=lack if isinstance(lack, SignedBackfill) else None)
    return None
