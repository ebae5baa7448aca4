"""The group manifest and group-log values: building, signing, chaining and validating.

A group's log is a sequence of slots. Slot 0 holds the **genesis** record: the creator's signed
manifest at epoch 0 (no commit). Slot ``s >= 1`` holds the value decided by Paxos that moves the
MLS group from epoch ``s - 1`` to ``s``: an MLS commit made in epoch ``s - 1`` plus the signed
manifest of epoch ``s`` (and the Welcome when devices are added). The acceptors of slot ``s`` are
the syncnodes named in the manifest of epoch ``s - 1``.

The manifest is the group's public, hash-chained configuration. Syncnodes cannot read MLS
state, so this is what they validate proposals against (:func:`validate_transition`); members
run the very same function before applying a decided value, plus MLS's own checks. One place for
these rules keeps syncnodes and devices from ever disagreeing about what is valid.
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Annotated

from proto.codec import (
    U32,
    U64,
    Hash32,
    MaxItems,
    MaxLen,
    PublicKey,
    Signature64,
    decode_as,
    encode,
    encode_struct,
    message,
)
from proto.compaction import MAX_POINT_BYTES, CompactionError, check_transition
from proto.errors import DecodeError, SyncnodeError
from proto.identity import SecretKey, fingerprint, is_valid_signature, register_context
from proto.mls_wire import parse_commit
from proto.paxos.messages import MAX_ACCEPTORS, Certificate, GroupId, value_hash
from proto.paxos.quorum import AcceptorSet, CertificateError, verify_certificate
from proto.ticket import Addrs

MANIFEST_CTX = register_context("syncnode/manifest/v1")
MAX_DEVICES = 1000
MAX_COMMIT_BYTES = 1024 * 1024
MAX_WELCOME_BYTES = 4 * 1024 * 1024
GENESIS_SLOT = 0


class Role(enum.IntEnum):
    """What a member device may do (stable on the wire).

    * ``ADMIN`` changes the group: adds and removes devices, changes roles and the syncnode
      set. The creator is admin, and a group always keeps at least one.
    * ``WRITER`` edits the document (its encrypted updates are stored and applied).
    * ``READER`` receives and decrypts, and sends no envelopes at all: syncnodes refuse any
      envelope a reader signed and members drop one that slips past (:func:`may_send`).

    Every member, reader included, may commit a pure key update of its own leaf (post-compromise
    security needs it); only admins commit anything else (:func:`validate_transition`)."""

    WRITER = 1
    ADMIN = 2
    READER = 3


@dataclass(frozen=True)
class DeviceEntry:
    """A member device: its MLS signature key (and fingerprint), iroh endpoint and MLS leaf.
    ``addrs`` are dialling hints for the endpoint as of when the device was added (the
    endpoint id authenticates; a stale address can only fail to connect)."""

    fingerprint: Hash32
    sig_pub: PublicKey
    endpoint_id: PublicKey
    leaf: U32
    role: Role
    addrs: Addrs = ()


@dataclass(frozen=True)
class SyncnodeEntry:
    """A syncnode of the group: its node id and last known addresses (dialling hints)."""

    node_id: PublicKey
    addrs: Addrs


@dataclass(frozen=True)
class Manifest:
    group_id: GroupId
    epoch: U64
    devices: Annotated[tuple[DeviceEntry, ...], MaxItems(MAX_DEVICES)]
    syncnodes: Annotated[tuple[SyncnodeEntry, ...], MaxItems(MAX_ACCEPTORS)]
    crdt_type: Annotated[str, MaxLen(32)]
    compaction: Annotated[bytes, MaxLen(MAX_POINT_BYTES)] | None
    prev_manifest_hash: Hash32 | None
    commit_hash: Hash32 | None

    def device(self, fpr: bytes) -> DeviceEntry | None:
        for d in self.devices:
            if d.fingerprint == fpr:
                return d
        return None

    def acceptors(self) -> AcceptorSet:
        """The acceptor set of the *next* slot (this manifest's syncnodes)."""
        return AcceptorSet(frozenset(s.node_id for s in self.syncnodes))

    @cached_property
    def wire(self) -> bytes:
        """The canonical encoding (what is signed and hashed). Cached, like :meth:`hash`: a
        frozen manifest is encoded again by every check of a transition, decision and learn,
        on syncnodes and devices alike (a fifth of verifying a decision)."""
        return encode_struct(self)

    @cached_property
    def _digest(self) -> bytes:
        return _hash(b"syncnode-manifest", self.wire)

    def hash(self) -> bytes:
        return self._digest


@message(0x30)
@dataclass(frozen=True)
class LogValue:
    """What a slot of the group log holds. ``commit`` is None only in the genesis record."""

    manifest: Manifest
    signer: Hash32
    signature: Signature64
    commit: Annotated[bytes, MaxLen(MAX_COMMIT_BYTES)] | None
    welcome: Annotated[bytes, MaxLen(MAX_WELCOME_BYTES)] | None

    def encode(self) -> bytes:
        return encode(self)

    @staticmethod
    def decode(data: bytes) -> LogValue:
        return decode_as(data, LogValue)


def may_send(entry: DeviceEntry) -> bool:
    """Whether envelopes signed by this member (in the manifest of their epoch) are accepted:
    every role but ``READER``. Syncnodes and members both ask this."""
    return entry.role != Role.READER


def _hash(person: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32, person=person[:16]).digest()


def commit_hash(commit: bytes) -> bytes:
    return _hash(b"syncnode-commit", commit)


def genesis_hash(genesis: bytes) -> bytes:
    """What binds a group to its genesis: the hash of the slot-0 :class:`LogValue` bytes.

    The group id is random and names nothing by itself: anyone can sign a well-formed genesis
    for any id (:func:`validate_genesis` checks only its form and self-signature). An invite
    ticket therefore carries this hash, and the new device takes from a syncnode only the
    genesis whose bytes hash to it. The encoding is canonical (:mod:`proto.codec` rejects any
    other), so the bytes a syncnode stored and the bytes a member re-encodes are the same."""
    return _hash(b"syncnode-genesis", genesis)


# -- errors ------------------------------------------------------------------------------------


class Rule(enum.IntEnum):
    """Which validation rule a value broke. Stable on the wire: append only."""

    MALFORMED = 1
    WRONG_GROUP = 2
    WRONG_EPOCH = 3
    BROKEN_CHAIN = 4
    SIGNER_NOT_MEMBER = 5
    BAD_SIGNATURE = 6
    COMMIT_MISMATCH = 7
    ROSTER_MISMATCH = 8
    NOT_ADMIN = 9
    BAD_ROSTER = 10
    BAD_GENESIS = 11
    BAD_COMPACTION = 12
    READER_COMPACTS = 13


class ManifestError(SyncnodeError):
    """A log value breaks a validation rule; ``rule`` is the machine-readable reason."""

    def __init__(self, rule: Rule, detail: str) -> None:
        super().__init__(f"{rule.name}: {detail}")
        self.rule = rule
        self.detail = detail


# -- building ----------------------------------------------------------------------------------


def sign_value(key: SecretKey, manifest: Manifest, commit: bytes | None,
               welcome: bytes | None = None) -> LogValue:
    """Sign ``manifest`` (which must already carry ``commit_hash(commit)``) with a device key."""
    sig = key.sign(MANIFEST_CTX, manifest.wire)
    return LogValue(manifest, fingerprint(key.public), sig, commit, welcome)


def genesis(key: SecretKey, group_id: bytes, endpoint_id: bytes,
            syncnodes: tuple[SyncnodeEntry, ...], crdt_type: str,
            addrs: tuple[str, ...] = ()) -> LogValue:
    """The signed genesis record of a new group created by the device holding ``key``."""
    creator = DeviceEntry(fingerprint(key.public), key.public, endpoint_id, 0, Role.ADMIN,
                          addrs)
    manifest = Manifest(group_id, 0, (creator,), syncnodes, crdt_type, None, None, None)
    return sign_value(key, manifest, None)


def next_manifest(prev: Manifest, commit: bytes, *, add: tuple[DeviceEntry, ...] = (),
                  remove: tuple[bytes, ...] = (),
                  syncnodes: tuple[SyncnodeEntry, ...] | None = None,
                  roles: dict[bytes, Role] | None = None,
                  compaction: bytes | None = None) -> Manifest:
    """The manifest following ``prev`` for ``commit``: removes fingerprints, gives the kept
    devices named in ``roles`` (fingerprint -> role) their new role, then adds devices at the
    leaves MLS assigns them (``leaf`` of the given entries is ignored). ``compaction`` is a
    new compaction point (:mod:`proto.compaction`); without one, ``prev``'s is carried
    forward, so the newest manifest always holds the group's latest point."""
    roles = roles or {}
    kept = [replace(d, role=roles[d.fingerprint]) if d.fingerprint in roles else d
            for d in prev.devices if d.fingerprint not in remove]
    leaves = assign_leaves({d.leaf for d in kept}, len(add))
    added = [replace(d, leaf=leaf) for d, leaf in zip(add, leaves, strict=True)]
    return Manifest(
        prev.group_id, prev.epoch + 1, tuple(kept + added),
        prev.syncnodes if syncnodes is None else syncnodes, prev.crdt_type,
        prev.compaction if compaction is None else compaction, prev.hash(), commit_hash(commit))


def assign_leaves(occupied: set[int], count: int) -> list[int]:
    """Leaves MLS gives ``count`` added members: the leftmost blank leaves (RFC 9420 7.7)."""
    out: list[int] = []
    leaf = 0
    while len(out) < count:
        if leaf not in occupied:
            out.append(leaf)
        leaf += 1
    return out


# -- validation --------------------------------------------------------------------------------


def _check_roster(m: Manifest) -> None:
    if not m.syncnodes:
        raise ManifestError(Rule.BAD_ROSTER, "no syncnodes")
    if len({s.node_id for s in m.syncnodes}) != len(m.syncnodes):
        raise ManifestError(Rule.BAD_ROSTER, "duplicate syncnode")
    if len({d.fingerprint for d in m.devices}) != len(m.devices):
        raise ManifestError(Rule.BAD_ROSTER, "duplicate device")
    if len({d.leaf for d in m.devices}) != len(m.devices):
        raise ManifestError(Rule.BAD_ROSTER, "two devices share a leaf")
    for d in m.devices:
        if fingerprint(d.sig_pub) != d.fingerprint:
            raise ManifestError(Rule.BAD_ROSTER, "device fingerprint does not match its key")
    if not any(d.role == Role.ADMIN for d in m.devices):
        raise ManifestError(Rule.BAD_ROSTER, "no admin left")


def _check_signature(signer: DeviceEntry | None, value: LogValue) -> DeviceEntry:
    if signer is None:
        raise ManifestError(Rule.SIGNER_NOT_MEMBER, "signer is not a member of the group")
    if not is_valid_signature(signer.sig_pub, MANIFEST_CTX, value.manifest.wire,
                              value.signature):
        raise ManifestError(Rule.BAD_SIGNATURE, "manifest signature does not verify")
    return signer


def validate_genesis(group_id: bytes, value: LogValue) -> None:
    """Raise :class:`ManifestError` unless ``value`` is a well-formed genesis of ``group_id``."""
    m = value.manifest
    if m.group_id != group_id:
        raise ManifestError(Rule.WRONG_GROUP, "manifest names another group")
    if m.epoch != 0 or value.commit is not None or m.prev_manifest_hash is not None \
            or m.commit_hash is not None or value.welcome is not None:
        raise ManifestError(Rule.BAD_GENESIS, "genesis is epoch 0 with no commit or parent")
    if m.compaction is not None:  # nothing to compact yet: a field a node would store unchecked
        raise ManifestError(Rule.BAD_GENESIS, "genesis has no compaction point")
    _check_roster(m)
    if len(m.devices) != 1 or m.devices[0].leaf != 0 or m.devices[0].role != Role.ADMIN:
        raise ManifestError(Rule.BAD_GENESIS, "genesis has exactly its creator, admin at leaf 0")
    _check_signature(m.device(value.signer), value)


def validate_transition(prev: Manifest, value: LogValue) -> None:
    """Raise :class:`ManifestError` unless ``value`` may follow ``prev`` in the group log.

    The rules of DESIGN.md "syncnode validation": the signer is a device of ``prev`` and signed
    the new manifest; the manifest chains to ``prev``; the commit was made in ``prev``'s epoch by
    the signer's leaf; its adds and removes are exactly the roster change; an admin may add,
    remove, change roles and syncnodes, anyone else only update its own keys; at least one
    admin remains (:func:`_check_roster`); the compaction point is unchanged, or advanced by
    a writer or admin (:func:`proto.compaction.check_transition`).
    """
    m = value.manifest
    if m.group_id != prev.group_id:
        raise ManifestError(Rule.WRONG_GROUP, "manifest names another group")
    if m.epoch != prev.epoch + 1:
        raise ManifestError(Rule.WRONG_EPOCH, f"manifest epoch {m.epoch} after {prev.epoch}")
    if m.prev_manifest_hash != prev.hash():
        raise ManifestError(Rule.BROKEN_CHAIN, "prev_manifest_hash does not match")
    if m.crdt_type != prev.crdt_type:
        raise ManifestError(Rule.BROKEN_CHAIN, "crdt_type cannot change")
    signer = _check_signature(prev.device(value.signer), value)
    if value.commit is None or m.commit_hash != commit_hash(value.commit):
        raise ManifestError(Rule.COMMIT_MISMATCH, "commit_hash does not match the commit")
    try:
        info = parse_commit(value.commit)
    except DecodeError as exc:
        raise ManifestError(Rule.COMMIT_MISMATCH, f"unreadable commit: {exc}") from None
    if info.group_id != m.group_id or info.epoch != prev.epoch:
        raise ManifestError(Rule.COMMIT_MISMATCH, "commit is for another group or epoch")
    if info.sender_leaf != signer.leaf:
        raise ManifestError(Rule.COMMIT_MISMATCH, "commit sender is not the manifest signer")
    if info.other_proposals:
        raise ManifestError(Rule.COMMIT_MISMATCH, "commit carries unsupported proposals")
    _check_roster(m)
    try:
        check_transition(prev.compaction, m.compaction, signer.fingerprint,
                         signer_may_send=may_send(signer))
    except CompactionError as exc:
        raise ManifestError(Rule.READER_COMPACTS if exc.not_allowed else Rule.BAD_COMPACTION,
                            exc.detail) from None

    by_leaf = {d.leaf: d for d in prev.devices}
    removed = set()
    for leaf in info.removed_leaves:
        if leaf not in by_leaf or by_leaf[leaf].fingerprint in removed:
            raise ManifestError(Rule.ROSTER_MISMATCH, f"commit removes unknown leaf {leaf}")
        removed.add(by_leaf[leaf].fingerprint)
    prev_fprs = {d.fingerprint for d in prev.devices}
    new_fprs = {d.fingerprint for d in m.devices}
    if new_fprs & removed or (prev_fprs - removed) - new_fprs:
        raise ManifestError(Rule.ROSTER_MISMATCH, "removed devices differ from the commit")
    added = [d for d in m.devices if d.fingerprint not in prev_fprs]
    if Counter(d.sig_pub for d in added) != Counter(info.added_signature_keys):
        raise ManifestError(Rule.ROSTER_MISMATCH, "added devices differ from the commit")
    kept_leaves = {d.leaf for d in prev.devices if d.fingerprint not in removed}
    expected = assign_leaves(kept_leaves, len(added))
    by_key = {d.sig_pub: d for d in added}
    if [by_key[k].leaf for k in info.added_signature_keys] != expected:
        raise ManifestError(Rule.ROSTER_MISMATCH, "added devices are not at the leaves MLS uses")

    for d in m.devices:
        old = prev.device(d.fingerprint)
        if old is not None and (old.sig_pub, old.endpoint_id, old.leaf, old.addrs) != \
                (d.sig_pub, d.endpoint_id, d.leaf, d.addrs):
            raise ManifestError(Rule.ROSTER_MISMATCH, "an existing device entry changed")
    if signer.role != Role.ADMIN:
        _check_own_update(prev, m, signer, removed, added)


def _check_own_update(prev: Manifest, m: Manifest, signer: DeviceEntry, removed: set[bytes],
                      added: list[DeviceEntry]) -> None:
    """A writer or reader commits a pure key update of its own leaf and nothing else: no
    adds, no removes (not even of itself: MLS forbids a commit removing its committer, so
    leaving is a request an admin carries out), no role and no syncnode change."""
    who = signer.role.name.lower()
    if added:
        raise ManifestError(Rule.NOT_ADMIN, f"only admins add devices (signer is a {who})")
    if removed:
        raise ManifestError(Rule.NOT_ADMIN, f"only admins remove devices (signer is a {who})")
    if any(prev.device(d.fingerprint) != d for d in m.devices):
        raise ManifestError(Rule.NOT_ADMIN, f"only admins change roles (signer is a {who})")
    if m.syncnodes != prev.syncnodes:
        raise ManifestError(Rule.NOT_ADMIN,
                            f"only admins change the syncnodes (signer is a {who})")


def verify_decided(prev: Manifest, value_bytes: bytes, certificate: Certificate) -> LogValue:
    """Check a decided value for the slot after ``prev``: the certificate proves a decision
    by ``prev``'s syncnodes for exactly these bytes and that slot, and the value follows the
    manifest rules. What every learner (syncnode or device) runs before trusting a decision.
    Raises :class:`proto.paxos.quorum.CertificateError` or :class:`ManifestError`."""
    if certificate.group_id != prev.group_id or certificate.slot != prev.epoch + 1:
        raise CertificateError("certificate is for another group or slot")
    if value_hash(value_bytes) != certificate.value_hash:
        raise CertificateError("value does not match the certificate")
    verify_certificate(certificate, prev.acceptors())
    try:
        value = LogValue.decode(value_bytes)
    except DecodeError as exc:
        raise ManifestError(Rule.MALFORMED, str(exc)) from None
    validate_transition(prev, value)
    return value
