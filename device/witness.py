"""Evidence that a syncnode withholds: the signed statements a document keeps of each of its
syncnodes, and the checks that turn two of them that contradict each other into a
``withholding`` alarm carrying a :class:`proto.holdings.WithholdingProof` (issue 17).

What is kept, per syncnode (bounded: two statements per syncnode of the document, in memory
and in the ``witness`` table):

* the **ack** of our own envelope with the highest seq (each ``Stored`` is verified when it
  arrives: an ack that does not verify is not counted toward durability);
* the newest **heads** it signed for us.

When they are checked:

* **heads**, after each (re)connect and every ``holdings_interval``: we ask for the watermark
  of each sender we know (ourselves first, at most ``MAX_HOLDING_SENDERS``) and probe the seq
  of our kept ack. The new heads are compared with the kept ack (did it drop what it acked?)
  and with the kept heads (did it shrink?).
* every **backfill page** (:meth:`Witness.backfilled`): a complete answer is compared with the
  kept ack and heads (did it leave out what it said it held?).

A contradiction is proven only between statements made while the syncnode stayed one of the
document's syncnodes (:func:`named_throughout`): a syncnode removed from the document may
delete its data, and one added back later starts over. And only within one **incarnation** of
its storage (:mod:`proto.holdings`): when a statement (ack, heads or backfill page) names
another incarnation than the kept ones, the syncnode lost its database and restarted with the
same key. That is logged and raised as a ``syncnode-reset`` alarm carrying the two statements
(:class:`proto.resets.StorageReset`, no accusation: the user learns the node forgot what it
had acknowledged); the kept statements are dropped, so the old incarnation's acks are never
compared with the new one's statements, and checking goes on within the new incarnation.

What is only **suspected** -- heads or pages whose signature does not verify, statements
stamped before an ack of the same incarnation we already held (``backdated``), refusals to sign
heads, serving less than the other syncnodes -- is logged, and the first two raise
``withholding-suspected`` (without a proof: nobody else could check it). The pure parts are in
:mod:`proto.holdings` and :mod:`proto.resets`.

**Re-sending after a reset: decided against** for envelopes already durable (a quorum had
acknowledged them, the old incarnation among it). The node's peers refill it with everything
they hold (anti-entropy, :mod:`syncnode.reconcile`, checked by the simulator's ``wipe``
scenario): that covers every sender's envelopes, not only ours, and works while we are
offline; and a device no longer keeps an envelope once it is durable, so it could re-send only
the few it has not settled yet. Those it does re-send: envelopes still waiting for a quorum
stop counting the old incarnation's ack (:attr:`Witness.on_reset`; the outbox sends them to the
node again), or a copy the node lost would count toward durability.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from device.replica import Replica
from proto.codec import decode_as, encode
from proto.envelope import Envelope
from proto.errors import DecodeError, SyncnodeError
from proto.holdings import (
    MAX_HOLDING_SENDERS,
    Entry,
    Holdings,
    SignedAck,
    SignedBackfill,
    SignedHeads,
    WithholdingProof,
    contradiction,
    verify,
)
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import Manifest
from proto.resets import reset_between, reset_detail
from proto.rpc import RemoteError, SyncnodeClient, watermarks_of
from proto.service import BackfillPage, Stored
from proto.stampclock import backdated

log = get_logger("device.witness")


class BadAck(SyncnodeError):
    """A syncnode's ``Stored`` is not a valid signed ack of the envelope we sent."""


def ack_of(node: bytes, stored: Stored) -> SignedAck:
    return SignedAck(node, stored.incarnation, stored.group_id, stored.sender, stored.seq,
                     stored.digest, stored.at, stored.signature)


def backfill_of(node: bytes, group_id: bytes, marks: dict[bytes, int],
                page: BackfillPage) -> SignedBackfill:
    """The statement a backfill page from ``node`` answering ``marks`` is signed as."""
    return SignedBackfill(node, page.incarnation, group_id, watermarks_of(marks),
                          tuple(Entry(e.sender, e.seq, e.digest()) for e in page.envelopes),
                          page.more, page.at, page.signature, page.covered)


def named_throughout(manifests: Sequence[Manifest], node: bytes) -> bool:
    """Whether ``node`` is a syncnode of every manifest of a span of epochs."""
    return all(node in m.acceptors() for m in manifests)


class Witness:
    """One document's evidence about its syncnodes (see the module doc)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.store = replica.store
        self.acks: dict[bytes, tuple[int, SignedAck]] = {}
        """Syncnode -> (our epoch when it arrived, its ack of our highest seq)."""
        self.heads: dict[bytes, tuple[int, SignedHeads]] = {}
        self.convicted: set[bytes] = set()
        self.on_reset: list[Callable[[bytes], None]] = []
        """Told the node id of each syncnode found to have a new incarnation."""
        for node, kind, epoch, raw in self.store.all(
                "SELECT node_id, kind, epoch, statement FROM witness WHERE group_id=?",
                replica.group_id):
            try:
                if kind == "ack":
                    self.acks[node] = (epoch, ack_of(node, decode_as(raw, Stored)))
                else:
                    self.heads[node] = (epoch, decode_as(raw, Holdings).heads)
            except DecodeError:  # kept before statements named an incarnation: start over
                log.info("old witness statement dropped", doc=short_id(replica.group_id),
                         node=short_id(node), kind=kind)

    # -- keeping statements ---------------------------------------------------------------------

    def _keep(self, node: bytes, kind: str, message: Stored | Holdings) -> None:
        """Persist a statement as the message it came in (the node id is the row's)."""
        r = self.replica
        with self.store.transaction(durable=False) as db:  # evidence, not state: no fsync
            db.execute("INSERT OR REPLACE INTO witness VALUES (?,?,?,?,?)",
                       (r.group_id, node, kind, r.epoch, encode(message)))

    def acked(self, node: bytes, env: Envelope, stored: Stored) -> None:
        """Check a ``Stored`` from ``node`` for ``env``, keep it if it is our newest ack there.
        Raises :class:`BadAck` (the ack must then not count)."""
        ack = ack_of(node, stored)
        if (ack.group_id, ack.sender, ack.seq, ack.digest) != \
                (env.group_id, env.sender, env.seq, env.digest()) or not ack.valid():
            self._suspect(node, "its ack of our update is not validly signed")
            raise BadAck(f"syncnode {short_id(node)} sent an ack that does not verify")
        self._renewed(node, ack)
        kept = self.acks.get(node)
        if kept is None or ack.seq > kept[1].seq:
            self.acks[node] = (self.replica.epoch, ack)
            self._keep(node, "ack", stored)

    # -- checking -------------------------------------------------------------------------------

    async def run(self, client: SyncnodeClient) -> None:
        """Check ``client``'s heads now (a link just came up) and every ``holdings_interval``."""
        r = self.replica
        while r.status == "active":
            await self.check(client)
            await trio.sleep(r.host.config.holdings_interval)

    async def check(self, client: SyncnodeClient) -> None:
        r = self.replica
        node = client.node_id
        kept = self.acks.get(node)  # taken before asking: the answer must be stamped later
        me = r.me
        senders = [me, *sorted(s for s in r.buffer.delivered if s != me)][:MAX_HOLDING_SENDERS]
        probes = [(kept[1].sender, kept[1].seq)] if kept else []
        try:
            heads = await client.holdings(r.group_id, senders, probes)
        except RemoteError as exc:
            log.warning("syncnode does not sign its heads", doc=short_id(r.group_id),
                        node=short_id(node), code=exc.code.name, detail=exc.detail)
            return
        if heads.node_id != node or heads.group_id != r.group_id or not heads.valid():
            self._suspect(node, "its signed heads do not verify")
            return
        self._renewed(node, heads)
        if kept is not None and kept[1].incarnation != heads.incarnation:
            kept = None  # an ack of its old storage (a reset while we asked): not comparable
        if backdated(kept[1].at if kept else None, heads.at):
            self._suspect(node, "its heads are stamped before an ack it gave us earlier")
            return
        self._compare(node, [kept, self.heads.get(node)], heads)
        prev = self.heads.get(node)
        if prev is None or heads.at > prev[1].at:
            self.heads[node] = (r.epoch, heads)
            self._keep(node, "heads", Holdings(heads))
        self._note_lag(node, heads)

    def backfilled(self, node: bytes, marks: dict[bytes, int], page: BackfillPage) -> None:
        """Check a backfill page from ``node`` answering our ``marks``."""
        r = self.replica
        st = backfill_of(node, r.group_id, marks, page)
        if not st.valid():
            self._suspect(node, "its backfill answer is not validly signed")
            return
        self._renewed(node, st)
        if not page.more:
            self._compare(node, [self.acks.get(node), self.heads.get(node)], st)

    def _compare(self, node: bytes, held: list[tuple[int, SignedAck] | tuple[int, SignedHeads]
                                             | None], lack: SignedHeads | SignedBackfill) -> None:
        r = self.replica
        for kept in held:
            if kept is None or node in self.convicted:
                continue
            epoch, statement = kept
            span = [r.values[s].manifest for s in range(min(epoch, r.epoch), r.epoch + 1)
                    if s in r.values]
            if not named_throughout(span, node):
                continue  # removed meanwhile: it may have deleted the group
            proof = contradiction(statement, lack)
            if proof is not None:
                self._convict(node, proof)

    def _renewed(self, node: bytes, new: SignedAck | SignedHeads | SignedBackfill) -> bool:
        """If ``new`` (verified) names another incarnation than what we kept of ``node``: raise
        ``syncnode-reset`` with the evidence, forget the kept statements (here and stored) and
        tell :attr:`on_reset`. Whether it did. A node convicted before stays convicted."""
        kept = [k[1] for k in (self.acks.get(node), self.heads.get(node)) if k is not None]
        evidence = next((e for e in (reset_between(old, new) for old in kept) if e), None)
        if evidence is None or evidence.old is None:
            return False
        r = self.replica
        old = evidence.old.incarnation
        log.warning("syncnode lost its storage: new incarnation", doc=short_id(r.group_id),
                    node=short_id(node), old=old.hex(), new=new.incarnation.hex())
        r.alarm("syncnode-reset", reset_detail(node, old, new.incarnation),
                evidence=encode(evidence))
        self.acks.pop(node, None)
        self.heads.pop(node, None)
        with self.store.transaction(durable=False) as db:
            db.execute("DELETE FROM witness WHERE group_id=? AND node_id=?", (r.group_id, node))
        for told in self.on_reset:
            told(node)
        return True

    def _convict(self, node: bytes, proof: WithholdingProof) -> None:
        finding = verify(proof)  # ours must hold up on its own, as anyone will check it
        self.convicted.add(node)
        self.replica.alarm("withholding", f"syncnode {node.hex()} withheld an update it had "
                           "signed that it held (proof attached)", evidence=encode(proof))
        log.error("syncnode proven to withhold", doc=short_id(self.replica.group_id),
                  node=short_id(node), finding=finding.describe())

    def _suspect(self, node: bytes, why: str) -> None:
        self.replica.alarm("withholding-suspected", f"syncnode {node.hex()}: {why}")

    def _note_lag(self, node: bytes, heads: SignedHeads) -> None:
        """Serving less than we delivered from others is only a hint (it may be behind)."""
        delivered = self.replica.buffer.delivered
        behind = sum(1 for w in heads.marks if w.seq < delivered.get(w.sender, 0))
        if behind:
            log.info("syncnode holds less than we delivered", doc=short_id(self.replica.group_id),
                     node=short_id(node), senders_behind=behind)
