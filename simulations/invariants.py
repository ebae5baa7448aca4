"""What must hold in every run, checked after every step and once the world is quiet.

Continuous (after each step):
- **agreement**: no slot has two different decided values among the honest syncnodes' logs and
  the devices' logs (with a colluding majority, devices may split: see ``detected``);
- **certificates**: every decision a device applied verifies against the manifest before it
  (certificate, value hash, manifest transition), back to a valid genesis;
- **acked-kept**: an update acknowledged as durable survives the device's own crash.
- **join-complete** (checked by the runner when a join returns): the new device holds every
  update its inviter held when it made the ticket, also if the inviter crashed as the add was
  decided.
- **admin-only**: in every log (honest syncnodes' and devices'), a decision signed by a member
  that was not an admin in the manifest before it changes nothing but the epoch, the commit and
  the hash chain (no devices, roles or syncnodes): checked on the manifests themselves, not by
  :func:`proto.manifest.validate_transition`, which is what it checks;
- **join-done** (scenarios where nothing may stop a join: checked when a join fails, and at the
  end): a device that a decided slot added completes its join. A Byzantine minority must not
  leave a member nobody holds (a forged genesis did: issue 14, finding 4).

Final (after faults heal and traffic stops):
- **converged**: all current members are at the same epoch and hold identical documents;
- **acked-delivered**: every member's document holds every update ever acknowledged durable;
- **removed-blind**: a removed device cannot decrypt any update sealed after its removal;
- **no-plaintext**: no syncnode's database or WAL contains an edit's marker;
- **acked-stored** (scenarios with ``acked_everywhere``): every honest syncnode the document's
  manifest names holds every update any device had acknowledged by a quorum, also after
  syncnodes were wiped (anti-entropy, :mod:`syncnode.reconcile`);
- **reader-silent**: no honest syncnode stores an update from a sender that was a reader at the
  update's epoch;
- **compacted**: an honest syncnode keeps no envelope that the compaction point it applied
  covers (but the state), and has applied the group's decided point once it holds its state;
- **detected**: with a colluding majority, any two devices whose logs differ include one that
  raised an equivocation alarm with a verifiable EquivocationProof;
- **alarms**: with an honest majority, no device raised an equivocation, invalid-decision,
  bad-update or bad-compaction alarm and no document failed; and in every scenario, every
  ``syncnode-reset`` alarm holds a :class:`~proto.resets.StorageReset` that verifies and names
  a syncnode whose database was wiped (an honest node's incarnation changes with nothing
  else), and a device that kept a node's statements when it was wiped and keeps statements of
  its new storage now raised one;
- **never-accused**: every ``withholding`` alarm holds a :class:`WithholdingProof` that verifies
  on its own, and none (nor a ``withholding-suspected`` alarm) names an honest syncnode: a proof
  against an honest node must be impossible, in every scenario;
- **withholding-detected**: a withholding syncnode (``withhold`` behaviour) from which a current
  member holds a signed ack is named by some device's ``withholding`` alarm whose proof
  verifies (issue 17: withholding leaves evidence).

The last two, and the ``syncnode-reset`` part of **alarms**, are checked in
:mod:`simulations.evidence`.
"""

from __future__ import annotations

from device.mls import MlsError
from proto.codec import decode_as
from proto.compaction import CompactionPoint
from proto.errors import SyncnodeError
from proto.manifest import LogValue, ManifestError, Role, validate_genesis, verify_decided
from proto.paxos.messages import EquivocationProof, value_hash
from proto.paxos.quorum import CertificateError, verify_certificate
from simulations.evidence import never_accused, resets, withholding_detected
from simulations.violation import Violation
from simulations.world import SimDevice, World

MARK = b"MARK-"
"""Every edit writes a marker starting with this; a syncnode must never store it readable."""


class Checker:
    def __init__(self, world: World, *, colluding: bool, joins_complete: bool = False,
                 acked_everywhere: bool = False) -> None:
        self.world = world
        self.colluding = colluding
        self.joins_complete = joins_complete
        self.acked_everywhere = acked_everywhere
        self._verified: dict[int, int] = {}  # device index -> highest slot verified

    # -- continuous ------------------------------------------------------------------------------

    def continuous(self) -> list[Violation]:
        return [*self.agreement(), *self.certificates(), *self.acked_kept(), *self.admin_only()]

    def agreement(self) -> list[Violation]:
        out = []
        seen: dict[int, tuple[bytes, str]] = {}

        def record(slot: int, value: bytes, who: str) -> None:
            h = value_hash(value)
            first = seen.setdefault(slot, (h, who))
            if first[0] != h:
                out.append(Violation("agreement",
                                     f"slot {slot}: {first[1]} and {who} hold different values"))

        for node in self.world.nodes:
            if node.honest:
                for slot, (value, _cert) in sorted(self.world.node_log(node).items()):
                    record(slot, value, node.name)
        if not self.colluding:
            for dev in self.world.devices:
                if dev.doc is not None:
                    for slot, d in sorted(dev.doc.decided.items()):
                        record(slot, d.value, dev.name)
        return out

    def certificates(self) -> list[Violation]:
        out = []
        for dev in self.world.devices:
            doc = dev.doc
            if doc is None:
                continue
            start = self._verified.get(dev.index, -1) + 1
            for slot in range(start, doc.epoch + 1):
                try:
                    if slot == 0:
                        validate_genesis(doc.group_id, doc.values[0])
                    elif slot in doc.values:
                        d = doc.decided.get(slot)
                        if d is None:
                            raise CertificateError(f"slot {slot} applied without a certificate")
                        value = verify_decided(doc.values[slot - 1].manifest, d.value,
                                               d.certificate)
                        if value != doc.values[slot]:
                            raise CertificateError(f"slot {slot}: applied value is not the "
                                                   "certified one")
                except (CertificateError, ManifestError, KeyError) as exc:
                    out.append(Violation("certificates", f"{dev.name}: {exc}"))
                    break
                self._verified[dev.index] = slot
        return out

    def acked_kept(self) -> list[Violation]:
        out = []
        for dev in self.world.devices:
            if dev.doc is not None and dev.acked:
                have = markers(dev.doc.value())
                lost = dev.acked - have
                if lost:
                    out.append(Violation("acked-kept", f"{dev.name} lost its own acknowledged "
                                         f"updates {sorted(lost)[:3]}"))
        return out

    def admin_only(self) -> list[Violation]:
        logs: list[tuple[str, dict[int, LogValue]]] = [
            (dev.name, dev.doc.values) for dev in self.world.devices if dev.doc is not None]
        for node in self.world.nodes:
            if node.honest:
                logs.append((node.name, {s: LogValue.decode(v) for s, (v, _c)
                                         in self.world.node_log(node).items()}))
        for who, values in logs:
            for slot in sorted(values):
                prev, value = values.get(slot - 1), values[slot]
                if prev is None:
                    continue
                signer = prev.manifest.device(value.signer)
                if signer is None or signer.role == Role.ADMIN:
                    continue
                m = value.manifest
                if m.devices != prev.manifest.devices or m.syncnodes != prev.manifest.syncnodes:
                    return [Violation("admin-only", f"{who}: slot {slot} by a "
                                      f"{signer.role.name.lower()} changes the membership")]
        return []

    # -- final -----------------------------------------------------------------------------------

    def final(self) -> list[Violation]:
        out = [*self.continuous(), *self.removed_blind(), *self.no_plaintext(),
               *self.reader_silent(), *self.compacted(), *never_accused(self.world),
               *withholding_detected(self.world), *resets(self.world)]
        if self.colluding:
            out += self.detected()
        else:
            out += [*self.converged(), *self.acked_delivered(), *self.alarms()]
        if self.joins_complete:
            out += self.joins_done()
        if self.acked_everywhere:
            out += self.acked_stored()
        return out

    def acked_stored(self) -> list[Violation]:
        """acked-stored: see the module doc."""
        members = self.world.members()
        if not members or members[0].doc is None:
            return []
        named = {e.node_id for e in members[0].doc.manifest.syncnodes}
        acked = {d.fingerprint: d.acked_seq for d in self.world.devices if d.acked_seq}
        out = []
        for node in self.world.nodes:
            if not node.honest or node.retired or node.key.public not in named:
                continue
            held = self.world.held(node)
            lacking = {s: [q for q in range(1, top + 1) if q not in held.get(s, ())]
                       for s, top in acked.items()}
            count = sum(len(v) for v in lacking.values())
            if count:
                example = next((s, v[0]) for s, v in lacking.items() if v)
                out.append(Violation("acked-stored", f"{node.name} lacks {count} acknowledged "
                                     f"updates, e.g. seq {example[1]} of "
                                     f"{example[0].hex()[:8]}"))
        return out

    def joins_done(self, devices: list[SimDevice] | None = None) -> list[Violation]:
        """join-done: every device (of ``devices``) a decided slot of an honest syncnode's log
        added holds the document, or is still joining."""
        added = self.added()
        out = []
        for dev in self.world.devices if devices is None else devices:
            slot = added.get(dev.fingerprint)
            if slot is not None and not dev.joined and not dev.joining:
                out.append(Violation("join-done", f"{dev.name} was added at slot {slot} but "
                                     "its join never completed"))
        return out

    def added(self) -> dict[bytes, int]:
        """Fingerprint -> the first slot whose manifest names it, in the honest logs."""
        first: dict[bytes, int] = {}
        for node in self.world.nodes:
            if node.honest:
                for slot, (value, _cert) in sorted(self.world.node_log(node).items()):
                    for d in LogValue.decode(value).manifest.devices:
                        first[d.fingerprint] = min(slot, first.get(d.fingerprint, slot))
        return first

    def converged(self) -> list[Violation]:
        members = self.world.members()
        if not members:
            return [Violation("converged", "no device holds the document any more")]
        first = members[0]
        assert first.doc is not None
        out = []
        for dev in members[1:]:
            assert dev.doc is not None
            if dev.doc.epoch != first.doc.epoch:
                out.append(Violation("converged", f"{dev.name} at epoch {dev.doc.epoch}, "
                                     f"{first.name} at {first.doc.epoch}"))
            elif dev.doc.value() != first.doc.value():
                out.append(Violation("converged", f"{dev.name} and {first.name} differ: "
                                     f"{_difference(first, dev)}"))
        return out

    def acked_delivered(self) -> list[Violation]:
        acked = set().union(*(d.acked for d in self.world.devices))
        out = []
        for dev in self.world.members():
            assert dev.doc is not None
            missing = acked - markers(dev.doc.value())
            if missing:
                out.append(Violation("acked-delivered", f"{dev.name} lacks {len(missing)} "
                                     f"acknowledged updates, e.g. {sorted(missing)[:3]}"))
        return out

    def removed_blind(self) -> list[Violation]:
        out = []
        honest = [n for n in self.world.nodes if n.honest]
        members = self.world.members()
        if not members:
            return out
        chain = members[0].doc.values if members[0].doc is not None else {}
        for dev in self.world.devices:
            if dev.device is None:
                continue
            me = dev.device.fingerprint
            removed_at = next((s for s in sorted(chain) if s and chain[s - 1].manifest.device(me)
                               and not chain[s].manifest.device(me)), None)
            if removed_at is None:
                continue
            group = dev.device.mls.load(self.world.group_id)
            for node in honest:
                for env in self.world.node_envelopes(node):
                    if env.epoch < removed_at or env.sender == me:
                        continue
                    try:
                        group.decrypt(env.ciphertext)
                    except MlsError:
                        continue
                    out.append(Violation("removed-blind", f"{dev.name}, removed at epoch "
                                         f"{removed_at}, decrypted an update of epoch "
                                         f"{env.epoch}"))
                    return out
        return out

    def reader_silent(self) -> list[Violation]:
        for node in self.world.nodes:
            if not node.honest:
                continue
            manifests = {s: LogValue.decode(v).manifest
                         for s, (v, _c) in self.world.node_log(node).items()}
            for env in self.world.node_envelopes(node):
                m = manifests.get(env.epoch)
                sender = m.device(env.sender) if m is not None else None
                if sender is not None and sender.role == Role.READER:
                    return [Violation("reader-silent", f"{node.name} stores an update of a "
                                      f"reader (epoch {env.epoch}, seq {env.seq})")]
        return []

    def compacted(self) -> list[Violation]:
        out = []
        for node in self.world.nodes:
            if not node.honest or node.retired:
                continue
            applied, decided = self.world.node_compaction(node)
            held = {(e.sender, e.seq): e for e in self.world.node_envelopes(node)}
            if applied is not None:
                point = CompactionPoint.decode(applied)
                covered = point.vector()
                kept = [k for k in held if k[1] <= covered.get(k[0], 0)
                        and k != (point.state_sender, point.state_seq)]
                if kept:
                    out.append(Violation("compacted", f"{node.name} keeps {len(kept)} "
                                         "envelopes its compaction point covers"))
            if decided is not None and decided != applied:
                point = CompactionPoint.decode(decided)
                state = held.get((point.state_sender, point.state_seq))
                if state is not None and state.digest() == point.state_digest:
                    out.append(Violation("compacted", f"{node.name} holds the state of the "
                                         "decided point but did not apply it"))
        return out

    def no_plaintext(self) -> list[Violation]:
        return [Violation("no-plaintext", f"{node.name}'s storage holds an edit in clear")
                for node in self.world.nodes if MARK in self.world.node_bytes(node)]

    def detected(self) -> list[Violation]:
        devs = [d for d in self.world.devices if d.doc is not None]
        out = []
        for i, a in enumerate(devs):
            for b in devs[i + 1:]:
                assert a.doc is not None and b.doc is not None
                split = [s for s in a.doc.decided.keys() & b.doc.decided.keys()
                         if a.doc.decided[s].value != b.doc.decided[s].value]
                if split and not (self._proof(a) or self._proof(b)):
                    out.append(Violation("detected", f"{a.name} and {b.name} applied different "
                                         f"values at slot {min(split)} and neither raised an "
                                         "equivocation alarm"))
        return out

    def _proof(self, dev: SimDevice) -> bool:
        """Has ``dev`` an equivocation alarm whose proof holds up on its own?"""
        assert dev.doc is not None
        for (evidence,) in dev.doc.store.all("SELECT evidence FROM alarms WHERE group_id=? "
                                             "AND kind='equivocation'", dev.doc.group_id):
            try:
                proof = decode_as(evidence, EquivocationProof)
                a, b = proof.first, proof.second
                prev = dev.doc.values[a.slot - 1].manifest.acceptors()
                verify_certificate(a, prev)
                verify_certificate(b, prev)
            except (SyncnodeError, KeyError):
                continue
            if a.slot == b.slot and a.value_hash != b.value_hash:
                return True
        return False

    def alarms(self) -> list[Violation]:
        out = []
        for dev in self.world.devices:
            if dev.doc is None:
                continue
            if dev.doc.status == "failed":
                out.append(Violation("alarms", f"{dev.name}'s document failed"))
            for alarm in dev.doc.alarms():
                if alarm.kind in ("equivocation", "invalid-decision", "bad-update",
                                  "bad-compaction"):
                    out.append(Violation("alarms", f"{dev.name}: {alarm.kind}: {alarm.detail}"))
        return out


def markers(value: dict[str, object]) -> set[str]:
    m = value.get("m")
    return set(m) if isinstance(m, dict) else set()


def _difference(a: SimDevice, b: SimDevice) -> str:
    assert a.doc is not None and b.doc is not None
    va, vb = a.doc.value(), b.doc.value()
    keys = sorted(k for k in va.keys() | vb.keys() if va.get(k) != vb.get(k))
    ma, mb = markers(va), markers(vb)
    return (f"containers {keys}; markers only in {a.name}: {sorted(ma - mb)[:3]}, "
            f"only in {b.name}: {sorted(mb - ma)[:3]}")

