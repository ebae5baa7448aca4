"""Byzantine syncnodes: the real :class:`~syncnode.service.Service` with one behaviour bent.

Each class overrides the smallest piece of the honest service that produces the attack, so
everything else (authentication, validation, storage) is the code operators run. Frame
corruption is not here: it is a network fault of the node's outgoing links
(:attr:`proto.transport.memory.Faults.corrupt`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from proto.envelope import Envelope
from proto.holdings import FetchHoldings, Holdings, Probe
from proto.identity import SecretKey
from proto.manifest import LogValue, genesis
from proto.messages import ErrorCode
from proto.paxos.acceptor import EMPTY, SlotState
from proto.paxos.messages import Accept, AcceptLeased, Decided, Prepare
from proto.service import (
    Backfill,
    BackfillPage,
    DecidedPage,
    FetchDecided,
    FetchHeads,
    Head,
    Heads,
    Watermark,
)
from syncnode.service import GroupState, RequestError, Service, Session


class WithholdingService(Service):
    """Stores and acknowledges everything, delivers nothing: no pushes, empty backfill pages
    and decided logs that stop at genesis. Devices must get all of it from the others.

    It is the realistic attacker of issue 17: it signs every ack (a device counts only signed
    acks toward durability) and it signs statements that agree with what it serves -- heads
    with nothing held and complete empty backfill answers. A device that checks the heads
    against an ack it holds then has the proof (:mod:`proto.holdings`)."""

    async def _backfill(self, session: Session, msg: Backfill) -> BackfillPage:
        self._require_member(session, await self.require_group(msg.group_id))
        at = await self.notary.stamp()
        return BackfillPage((), False, self.notary.incarnation, at,
                            await self.notary.backfill_signature(msg, at, (), False))

    async def _fetch_holdings(self, session: Session, msg: FetchHoldings) -> Holdings:
        g = await self.require_group(msg.group_id)
        self._require_member(session, g)
        at = await self.notary.stamp()
        return Holdings(self.notary.sign_heads(
            g.group_id, 0, tuple(Watermark(s, 0) for s in dict.fromkeys(msg.senders)),
            tuple(Probe(p.sender, p.seq, None) for p in dict.fromkeys(msg.probes)), at))

    async def _fetch_decided(self, session: Session, msg: FetchDecided) -> DecidedPage:
        page = await super()._fetch_decided(session, msg)
        return DecidedPage(page.group_id, page.genesis, (), 0)

    def _publish(self, g: GroupState, item: Envelope | Decided, *,
                 new_manifest: bool = False) -> None:
        return


class RefusingWithholdingService(WithholdingService):
    """The smarter withholder: as :class:`WithholdingService`, but it refuses to sign heads
    at all. Nothing it signs contradicts itself, so it cannot be proven to withhold; devices
    only suspect it (a syncnode that will not say what it holds), see SECURITY.md."""

    async def _fetch_holdings(self, session: Session, msg: FetchHoldings) -> Holdings:
        raise RequestError(ErrorCode.INTERNAL, "not now")


class StaleService(Service):
    """Serves its decided log frozen at ``stale_top`` (heads too), as a node that stopped
    learning would, or one replaying an old snapshot. Devices must not regress or stall."""

    stale_top = 1

    async def _fetch_decided(self, session: Session, msg: FetchDecided) -> DecidedPage:
        page = await super()._fetch_decided(session, msg)
        kept = tuple(d for d in page.decided if d.certificate.slot <= self.stale_top)
        return DecidedPage(page.group_id, page.genesis, kept, min(page.top, self.stale_top))

    async def _fetch_heads(self, session: Session, msg: FetchHeads) -> Heads:
        heads = await super()._fetch_heads(session, msg)
        return Heads(tuple(Head(h.group_id, min(h.top, self.stale_top)) for h in heads.heads))

    def _publish(self, g: GroupState, item: Envelope | Decided, *,
                 new_manifest: bool = False) -> None:
        if not isinstance(item, Decided):
            super()._publish(g, item, new_manifest=new_manifest)


class EquivocatingService(Service):
    """One of a colluding pair: keeps a separate acceptor state per proposer, so it promises
    and accepts for every proposer as if it had never heard of the others, even on slots it
    knows are decided. Two such nodes are a majority of three: two devices proposing for the
    same slot both get a certificate. Devices must detect that (EquivocationProof)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forks: dict[tuple[bytes, int, bytes], SlotState] = {}

    async def _paxos(self, session: Session, msg: Prepare | Accept | AcceptLeased) -> Any:
        await self.require_group(msg.group_id)
        await self.paxos.load(msg.group_id, msg.slot)  # what the acceptor reads, into memory
        key = (msg.group_id, msg.slot)
        fork = (msg.group_id, msg.slot, msg.ballot.proposer)
        real = self.acceptor.slots
        self.acceptor.slots = {key: self.forks.get(fork, EMPTY)}
        try:
            step = self.acceptor.handle(msg)
            self.forks[fork] = self.acceptor.slots[key]
        finally:
            self.acceptor.slots = real
        return self._paxos_reply(msg, step.reply)


class ForgedGenesisService(Service):
    """Serves a forged group under the real group's id (issue 14, finding 4): to anyone who
    asks for slot 0, a well-formed genesis signed by a key of its own (derived from its node key
    and the group, so a seed replays), naming the real syncnodes; and it shows every group's
    head to anyone. A device waiting to be added, to which honest syncnodes show nothing yet,
    reads this node's log first. Everything else is the honest service (members never ask for
    slot 0 again). A joiner must accept only the genesis its ticket names, and one syncnode's
    answers must never spoil what it reads from the others."""

    forgeries = 0
    """Forged geneses served (tests check the attack happened)."""

    async def _fetch_decided(self, session: Session, msg: FetchDecided) -> DecidedPage:
        g = await self.require_group(msg.group_id)
        if msg.from_slot != 0:
            return await super()._fetch_decided(session, msg)
        self.forgeries += 1
        forged = await self.forged_genesis(g.group_id)
        return DecidedPage(g.group_id, forged.encode(), (), g.top)

    async def _fetch_heads(self, session: Session, msg: FetchHeads) -> Heads:
        return Heads(tuple([Head(gid, g.top) for gid in msg.group_ids
                            if (g := await self.group(gid)) is not None]))

    async def forged_genesis(self, group_id: bytes) -> LogValue:
        real = await self.manifest_at(group_id, 0)
        key = SecretKey(hashlib.blake2b(self.key.seed + group_id, digest_size=32,
                                        person=b"forged-genesis").digest())
        return genesis(key, group_id, key.public, real.syncnodes, real.crdt_type)
