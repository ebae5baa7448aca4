"""The group's decided log on this device: learning and applying decisions, and our own commits.

* **decide** (:meth:`Membership.apply_decided`): a decided value is applied only in slot order
  (:func:`device.rules.decision_fit`), after its certificate and the manifest rules verify
  (:func:`proto.manifest.verify_decided`) and MLS accepts the commit from the signer, in one
  transaction with the MLS state. A second certified value for a slot we applied raises the
  ``equivocation`` alarm, with both certificates as evidence; a quorum certifying a value that
  breaks the rules raises ``invalid-decision``.
* **learn** (:meth:`Membership.learn`): fetch what a syncnode decided beyond our epoch.
* **commit** (:meth:`Membership.commit`): our membership changes, role changes and key
  rotations go through Paxos (:func:`device.paxos_driver.propose`) over the links that are
  up; if another device's commit wins the slot, it is applied and ours is rebuilt on the new
  epoch and proposed again. Adds, removes and role changes are the admins'
  (:meth:`Membership.require_admin` refuses the others before any network). Each decision of
  ours leaves a lease for the next slot (:class:`device.paxos_driver.LeaseBook`), so our next
  commit, if nobody else committed meanwhile, needs one round trip and no learn round.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from device.errors import DocumentError, NotAllowed, Offline
from device.inbox import Inbox
from device.links import Links
from device.mls import MlsError, identity_for
from device.outbox import Outbox
from device.paxos_driver import LeaseBook, ProposeFailed, propose
from device.replica import Replica
from device.rules import (
    Fit,
    admin_refusal,
    conflicts,
    decision_fit,
    last_admin,
    learn_more,
    learned_enough,
    linked_acceptors,
    reusable_proposal,
    status_after,
)
from proto.codec import encode
from proto.errors import SyncnodeError
from proto.identity import fingerprint, short_id
from proto.logs import get_logger
from proto.manifest import (
    DeviceEntry,
    LogValue,
    ManifestError,
    Role,
    Rule,
    next_manifest,
    sign_value,
    validate_transition,
    verify_decided,
)
from proto.paxos.messages import Decided, EquivocationProof
from proto.paxos.proposer import Lost
from proto.paxos.quorum import CertificateError
from proto.rpc import SyncnodeClient

log = get_logger("device.document")

FORK_PAGE = 64
"""Slots per request when looking for the slot a forked log decided differently."""


class Membership:
    """One document's decisions and commits (see the module doc)."""

    def __init__(self, replica: Replica, outbox: Outbox, inbox: Inbox, links: Links) -> None:
        self.replica = replica
        self.outbox = outbox
        self.inbox = inbox
        self.links = links
        self.store = replica.store
        self._propose_lock = trio.Lock()
        self.leases = LeaseBook()

    # -- decisions -------------------------------------------------------------------------------

    async def apply_decided(self, d: Decided) -> bool:
        """Apply the decision for the next slot (or check a known one for equivocation).
        Returns True if the epoch advanced."""
        async with self.replica.apply_lock:
            return self.apply_decided_now(d)

    def apply_decided_now(self, d: Decided) -> bool:
        """:meth:`apply_decided` for a caller that holds the replica's ``apply_lock``."""
        r = self.replica
        slot = d.certificate.slot
        fit = decision_fit(slot, d.certificate.group_id, ours=r.group_id,
                           active=r.status == "active", epoch=r.epoch)
        if fit is Fit.IGNORE:
            return False
        if fit is Fit.KNOWN:
            self._check_known(d)
            return False
        if fit is Fit.AHEAD:
            r.learn_wanted.fire()
            return False
        try:
            value = verify_decided(r.manifest, d.value, d.certificate)
        except CertificateError as exc:
            # Not a decision at all: one syncnode sent garbage or a forgery, which proves
            # nothing about the quorum. Ignored; the honest syncnodes serve the real one.
            log.warning("ignored a decision without a valid certificate",
                        doc=short_id(r.group_id), slot=slot, error=str(exc))
            return False
        except ManifestError as exc:
            if exc.rule is Rule.BROKEN_CHAIN:
                # A quorum of our syncnodes certified a value that follows another log: some
                # slot we applied was decided twice. :meth:`learn` looks for the second
                # certificate (the proof) on the next syncnode it asks.
                log.warning("a decision follows another log; looking for the fork",
                            doc=short_id(r.group_id), slot=slot)
                if not r.fork_suspected:
                    r.fork_suspected = True
                    r.learn_wanted.fire()
                return False
            r.alarm("invalid-decision", f"slot {slot}: {exc}")  # a quorum broke the rules
            return False
        signer = r.manifest.device(value.signer)
        assert signer is not None and value.commit is not None  # verify_decided checked
        try:
            committer, removed_by_commit = r.mls.apply_commit(value.commit)
        except MlsError as exc:
            self._fail(f"MLS rejected the decided commit of slot {slot}: {exc}")
            return False
        if committer != identity_for(signer.sig_pub):
            self._fail(f"slot {slot}: the MLS committer is not the manifest signer")
            return False
        status = status_after(removed_by_commit, value.manifest.device(r.me) is not None)
        with self.store.transaction(durable=False) as db:  # re-learnable, like receive()
            r.mls.persist()
            db.execute("INSERT INTO log VALUES (?,?,?,?)",
                       (r.group_id, slot, d.value, encode(d)))
            db.execute("UPDATE documents SET epoch=?, status=? WHERE group_id=?",
                       (slot, status, r.group_id))
            db.execute("DELETE FROM proposal WHERE group_id=? AND slot<=?", (r.group_id, slot))
        r.values[slot], r.decided[slot] = value, d
        r.epoch, r.status = slot, status
        log.info("decision applied", doc=short_id(r.group_id), slot=slot,
                 signer=short_id(value.signer), devices=len(value.manifest.devices))
        r.epoch_changed.fire()
        r.ledger.decided(value.manifest.compaction, slot)  # a new point: check it
        if status == "removed":
            r.alarm("removed", f"this device was removed at epoch {slot}")
            self.outbox.durable_changed.fire()
            return True
        if value.signer == r.me and value.welcome is not None:
            # Our add of a device: store the document for it in the epoch it joins, in the same
            # step that applies the add, whichever task applies it (a syncnode's push, learn,
            # or commit() after announcing to every syncnode, which can be much later).
            self.outbox.publish_state()
        self.inbox.deliver_future()
        return True

    def _check_known(self, d: Decided) -> bool:
        """Raise the ``equivocation`` alarm if ``d`` is a second certified value for a slot we
        applied; returns whether it was."""
        r = self.replica
        slot = d.certificate.slot
        known = r.decided.get(slot)
        if known is None or not conflicts(known.value, d.value):
            return False
        try:
            verify_decided(r.values[slot - 1].manifest, d.value, d.certificate)
        except (CertificateError, ManifestError):
            return False  # not a valid decision at all: a syncnode sent garbage
        proof = EquivocationProof(known.certificate, d.certificate)
        r.alarm("equivocation", f"two certified values for slot {slot}", encode(proof))
        return True

    async def find_fork(self, client: SyncnodeClient) -> None:
        """A certified decision did not follow our log: walk the syncnode's log back from our
        epoch for the slot it decided differently, and raise ``equivocation`` with both
        certificates. Pages of :data:`FORK_PAGE` slots, so a long log costs a few requests.
        Without a proof (this syncnode agrees with us), the next syncnode is asked; the
        ``invalid-decision`` alarm says so meanwhile."""
        r = self.replica
        top = r.epoch
        while top >= 1:
            start = max(1, top - FORK_PAGE + 1)
            page = await client.fetch_decided(r.group_id, start, top - start + 1)
            for d in page.decided:
                if start <= d.certificate.slot <= top and self._check_known(d):
                    r.fork_suspected = False
                    return
            top = start - 1
        r.alarm("invalid-decision", f"slot {r.epoch + 1}: certified by a quorum but follows "
                "another log; the fork is not yet proven")

    def _fail(self, reason: str) -> None:
        r = self.replica
        r.status = "failed"
        with self.store.transaction() as db:
            db.execute("UPDATE documents SET status='failed' WHERE group_id=?", (r.group_id,))
        r.alarm("invalid-decision", reason)

    async def learn(self, client: SyncnodeClient) -> None:
        """Fetch and apply every decision the syncnode has beyond our epoch."""
        r = self.replica
        if r.fork_suspected and client.node_id not in r.fork_searched:
            r.fork_searched.add(client.node_id)  # once per syncnode: its log does not change
            await self.find_fork(client)
        while r.status == "active":
            page = await client.fetch_decided(r.group_id, r.epoch + 1)
            progressed = False
            for d in page.decided:
                if not await self.apply_decided(d):
                    break  # the rest cannot follow a decision we could not apply
                progressed = True
            if not learn_more(progressed, r.epoch, page.top):
                return

    async def learn_round(self) -> None:
        """Before proposing, learn what the linked syncnodes decided beyond our epoch (so a
        ballot is not spent on a slot that is already taken). Returns once a quorum of the
        slot's acceptors answered, every link finished, or ``keepalive_timeout`` passed: a
        syncnode that is down, frozen or slow is not waited for (Paxos itself finds any
        decision this misses: the Promises report it). The others are cancelled."""
        acceptors = self.replica.manifest.acceptors()
        clients = [c for n, c in self.links.clients.items() if n in acceptors]
        learned = finished = 0
        enough = trio.Event()

        async def one(client: SyncnodeClient) -> None:
            nonlocal learned, finished
            try:
                await self.learn(client)
                learned += 1
            except SyncnodeError as exc:  # unreachable, or garbage from a faulty syncnode
                log.debug("learn failed", node=short_id(client.node_id), error=str(exc))
            finally:
                finished += 1
                if learned_enough(learned, finished, len(clients), acceptors.quorum):
                    enough.set()

        if not clients:
            return
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(one, client)
            with trio.move_on_after(self.replica.host.config.keepalive_timeout):
                await enough.wait()
            nursery.cancel_scope.cancel()

    # -- our commits -----------------------------------------------------------------------------

    async def commit(self, build: Callable[[], LogValue | None], *,
                     before_announce: Callable[[], Awaitable[object]] | None = None) -> int:
        """Get one commit of ours decided. ``build`` makes it for the current epoch (None: no
        longer needed). Losing a slot re-bases: the winner is applied and ``build`` runs again.
        ``before_announce``: see :func:`device.paxos_driver.propose`."""
        r = self.replica
        host = r.host
        cfg = host.config
        async with self._propose_lock:
            for _ in range(cfg.rebase_attempts):
                if r.status != "active":
                    raise DocumentError(f"document is {r.status}")
                await self.links.wait_for_quorum()
                if not self.leases.holds(r.group_id, r.epoch + 1):
                    # With a lease for the next slot the learn round is skipped: it only saves
                    # a wasted ballot, and a slot someone else took meanwhile shows up anyway
                    # (the syncnodes answer the Accept with the decision).
                    await self.learn_round()
                slot = r.epoch + 1
                row = self.store.one("SELECT slot, value FROM proposal WHERE group_id=?",
                                     r.group_id)
                mine: bytes | None = None
                earlier = reusable_proposal(row, slot)
                if earlier is not None:
                    value_bytes = earlier  # a commit of ours from before: finish it first
                else:
                    try:
                        value = build()
                        if value is not None:
                            validate_transition(r.manifest, value)
                    except (ManifestError, MlsError):
                        # Drop the commit MLS now holds as pending (the binding cannot clear
                        # it): reload the stored state, or every later commit of this device
                        # fails with "commit already pending" (found by the simulator).
                        r.mls = host.mls.load(r.group_id)
                        raise
                    if value is None:
                        return r.epoch
                    value_bytes = mine = value.encode()
                    with self.store.transaction() as db:
                        r.mls.persist()
                        db.execute("INSERT OR REPLACE INTO proposal VALUES (?,?,?)",
                                   (r.group_id, slot, value_bytes))
                acceptors = r.manifest.acceptors()
                # Again: the learn round may have dropped stale links (to syncnodes that
                # restarted), which redial at once.
                await self.links.wait_for_quorum()
                linked = linked_acceptors(self.links.clients, acceptors)
                if linked < acceptors.quorum:
                    raise Offline(f"{linked} of {len(acceptors)} syncnodes reachable, "
                                  f"a membership change needs {acceptors.quorum}")
                try:
                    outcome = await propose(host.key, self.links.quorum_links, r.group_id,
                                            slot, value_bytes, acceptors,
                                            attempts=cfg.propose_attempts,
                                            backoff=cfg.propose_backoff,
                                            timeout=cfg.keepalive_timeout,
                                            background=host.spawn, leases=self.leases,
                                            before_announce=before_announce)
                except ProposeFailed as exc:
                    raise Offline(str(exc)) from None
                if isinstance(outcome, Decided):
                    await self.apply_decided(outcome)
                    if mine is not None:
                        return slot
                    continue  # that was an older commit of ours; now build this one
                if isinstance(outcome, Lost):
                    log.info("our commit lost the slot; re-basing", doc=short_id(r.group_id),
                             slot=slot)
                    if outcome.value is not None:
                        await self.apply_decided(Decided(outcome.value, outcome.certificate))
                        if r.epoch < slot:
                            # The winner does not follow our log (equivocating syncnodes):
                            # re-basing cannot help; the alarm says why.
                            raise DocumentError(f"the value decided for slot {slot} does not "
                                                "apply to this device's log; see alarms")
                    continue
                assert isinstance(outcome, EquivocationProof)
                r.alarm("equivocation", f"conflicting certificates for slot {slot}",
                        encode(outcome))
                raise DocumentError("syncnodes equivocated; see alarms")
            raise Offline(f"no commit decided after {cfg.rebase_attempts} rounds of contention")

    async def add_device(self, key_package: bytes, sig_pub: bytes, endpoint_id: bytes,
                         role: Role = Role.WRITER, addrs: tuple[str, ...] = (), *,
                         before_announce: Callable[[], Awaitable[object]] | None = None) -> int:
        """Add a device by its KeyPackage; returns the slot that added it (the state for it is
        published as the add is applied). Admins only. ``before_announce``: see
        :func:`device.paxos_driver.propose`."""
        r = self.replica
        self.require_admin("add devices")
        fpr = fingerprint(sig_pub)

        def build() -> LogValue | None:
            if r.manifest.device(fpr) is not None:
                return None
            commit, welcome = r.mls.build_add([key_package])
            entry = DeviceEntry(fpr, sig_pub, endpoint_id, 0, role, addrs[:8])
            m = next_manifest(r.manifest, commit, add=(entry,))
            return sign_value(r.host.key, m, commit, welcome)

        return await self.commit(build, before_announce=before_announce)

    async def remove_device(self, device_id: str) -> int:
        """Remove the member whose id starts with ``device_id``; returns the slot. Admins
        only (any member may leave: :mod:`device.leaving`)."""
        r = self.replica
        self.require_admin("remove devices")
        target = self._find(device_id)
        if target.fingerprint == r.me:
            raise DocumentError("a device cannot remove itself (MLS forbids it); use leave, "
                                "which asks an admin to")

        def build() -> LogValue | None:
            entry = r.manifest.device(target.fingerprint)
            if entry is None:
                return None
            commit = r.mls.build_remove([entry.sig_pub])
            m = next_manifest(r.manifest, commit, remove=(entry.fingerprint,))
            return sign_value(r.host.key, m, commit)

        return await self.commit(build)

    async def rotate_keys(self) -> int:
        """Commit a key update (new epoch secrets, fresh leaf key); returns its slot."""
        r = self.replica

        def build() -> LogValue:
            commit = r.mls.build_update()
            return sign_value(r.host.key, next_manifest(r.manifest, commit), commit)

        return await self.commit(build)

    async def set_role(self, device_id: str, role: Role) -> int:
        """Give the member whose id starts with ``device_id`` ``role``: an MLS key update
        commit of ours with the role changed in its manifest. Admins only; the last admin
        cannot be demoted (make another member admin first). Returns the slot (the current
        epoch if the member has that role already)."""
        r = self.replica
        self.require_admin("change roles")
        target = self._find(device_id)
        if role != Role.ADMIN and last_admin(r.manifest, target.fingerprint):
            raise NotAllowed(f"{short_id(target.fingerprint)} is the last admin; make another "
                             "member admin first")

        def build() -> LogValue | None:
            entry = r.manifest.device(target.fingerprint)
            if entry is None or entry.role == role:
                return None
            commit = r.mls.build_update()
            m = next_manifest(r.manifest, commit, roles={entry.fingerprint: role})
            return sign_value(r.host.key, m, commit)

        return await self.commit(build)

    def require_admin(self, what: str) -> None:
        """Raise :class:`NotAllowed` (before any network) unless this device is an admin."""
        refusal = admin_refusal(self.replica.manifest, self.replica.me, what)
        if refusal is not None:
            raise NotAllowed(refusal)

    def _find(self, device_id: str) -> DeviceEntry:
        prefix = device_id.lower()
        found = [d for d in self.replica.manifest.devices
                 if d.fingerprint.hex().startswith(prefix)]
        if len(found) != 1:
            raise DocumentError(f"{'no' if not found else 'more than one'} member matches "
                                f"{device_id!r}")
        return found[0]
