"""Deliberately broken variants: negative controls that prove the checkers bite.

``--break NAME`` runs a sweep with one classic bug planted in the real code; the sweep must
report a violation within a bounded number of seeds (``tests/test_simulation.py`` holds the
bounds). Nothing here is used by a normal run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import device.membership
from proto.compaction import CompactionPoint
from proto.manifest import LogValue
from proto.paxos.acceptor import Acceptor, Step
from proto.paxos.messages import Accept, Nack, Prepare
from simulations.lease_model import LeaseForgettingAcceptor
from syncnode.compaction import Compactor
from syncnode.service import Service

if TYPE_CHECKING:
    from simulations.world import SimDevice, SimNode, World

VARIANTS = {
    "ignore-promises": "acceptors accept ballots below their promise (Paxos phase 2 unchecked)",
    "early-apply": "devices apply their own commit before Paxos decides it",
    "join-early": "a join returns once the device is added, before it holds the document",
    "trust-first-genesis": "a joiner takes the first genesis any syncnode serves (not checked "
                           "against the ticket) into one log shared by all syncnodes",
    "members-govern": "the role rule unchecked: non-admins add, remove and change roles, and "
                      "syncnodes and members accept it",
    "readers-send": "readers edit and send, and syncnodes and members take their updates",
    "blind-witness": "devices keep syncnodes' signed acks but never check heads or backfill "
                     "answers against them (a withholding syncnode goes unreported)",
    "no-reconcile": "syncnodes never reconcile: a wiped one holds only what devices send it "
                    "after the wipe",
    "silent-reset": "devices do not notice that a wiped syncnode signs under a new incarnation "
                    "of its storage (no syncnode-reset alarm; its old acks stay kept)",
    "send-unsynced": "devices send a sealed update before its seal is on disk (Store.sync "
                     "skipped): a power loss rolls back a seal others already hold",
    "delete-beyond": "syncnodes applying a compaction point delete (and refuse) the two seqs "
                     "of each covered sender that follow it, besides what it covers",
    "lease-forgets": "acceptors sign the fast path's next-slot promise (a lease) but keep no "
                     "record of it, so a rival's lower ballot is promised and accepted there",
}


class _PromiseIgnoringAcceptor(Acceptor):
    def _refusal(self, msg: Prepare | Accept, ctx: str) -> Step | None:
        step = super()._refusal(msg, ctx)
        return None if step is not None and isinstance(step.reply, Nack) else step


class _PromiseIgnoringService(Service):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acceptor = _PromiseIgnoringAcceptor(**{
            f.name: getattr(self.acceptor, f.name) for f in dataclasses.fields(Acceptor)})


class _LeaseForgettingService(Service):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acceptor = LeaseForgettingAcceptor(**{
            f.name: getattr(self.acceptor, f.name) for f in dataclasses.fields(Acceptor)})


class _GreedyCompactor(Compactor):
    def deletion(self, point: CompactionPoint) -> dict[bytes, int]:
        return {s: q + 2 for s, q in point.vector().items()}


class _GreedyCompactingService(Service):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compactor = _GreedyCompactor(self.store, self.groups, self.metrics)
        self.envelopes.compactor = self.compactor


def service_factory(variant: str | None) -> Callable[[SimNode], type[Service]] | None:
    planted = {"ignore-promises": _PromiseIgnoringService,
               "lease-forgets": _LeaseForgettingService,
               "delete-beyond": _GreedyCompactingService}.get(variant or "")
    if planted is not None:
        from simulations.world import SERVICES

        return lambda node: planted if node.honest else SERVICES[node.behaviour]
    return None


@contextmanager
def planted(variant: str | None, world: World) -> Iterator[None]:
    """Install the device-side bug of ``variant`` for the duration of a run."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    if variant == "join-early":
        with _joins_return_early():
            yield
        return
    if variant == "trust-first-genesis":
        with _joins_trust_first_genesis():
            yield
        return
    if variant == "blind-witness":
        with _blind_witness():
            yield
        return
    if variant == "no-reconcile":
        with _no_reconcile():
            yield
        return
    if variant in ("members-govern", "readers-send"):
        with _patched(*_ROLE_BUGS[variant]):
            yield
        return
    if variant == "send-unsynced":
        from device.store import Store
        honest_sync = Store.sync
        Store.sync = _no_sync  # type: ignore[method-assign]
        try:
            yield
        finally:
            Store.sync = honest_sync  # type: ignore[method-assign]
        return
    if variant == "silent-reset":
        with _patched(("device.witness", "reset_between", _no_reset)):
            yield
        return
    if variant != "early-apply":
        yield
        return
    honest_propose = device.membership.propose

    async def propose_after_applying(key: Any, clients: Any, group_id: bytes, slot: int,
                                     value: bytes, *args: Any, **kwargs: Any) -> Any:
        dev = next(d for d in world.devices if d.device is not None and d.device.key == key)
        _apply_undecided(dev, slot, value)
        return await honest_propose(key, clients, group_id, slot, value, *args, **kwargs)

    device.membership.propose = propose_after_applying
    try:
        yield
    finally:
        device.membership.propose = honest_propose


def _apply_undecided(dev: SimDevice, slot: int, value_bytes: bytes) -> None:
    """The bug: treat our own proposal as decided (no certificate) before Paxos is done."""
    doc = dev.doc
    if doc is None or slot != doc.epoch + 1:
        return
    value = LogValue.decode(value_bytes)
    assert value.commit is not None
    doc.mls.apply_commit(value.commit)
    with doc.store.transaction() as db:
        doc.mls.persist()
        db.execute("INSERT INTO log VALUES (?,?,?,?)", (doc.group_id, slot, value_bytes, None))
        db.execute("UPDATE documents SET epoch=? WHERE group_id=?", (slot, doc.group_id))
    doc.values[slot] = value
    doc.replica.epoch = slot


@contextmanager
def _joins_return_early() -> Iterator[None]:
    """The bug the join-complete invariant exists for (the README's join printed "joined" and
    `show` printed {}): the new device reports success as soon as it is a member, and
    takes the document from wherever it may come later."""
    import device.joining

    honest_first_state = device.joining.fetch_first_state
    honest_wait = device.joining._wait_for_state

    async def nothing(*args: Any, **kwargs: Any) -> bool:
        return False

    async def no_wait(*args: Any, **kwargs: Any) -> None:
        return None

    device.joining.fetch_first_state = nothing  # type: ignore[assignment]
    device.joining._wait_for_state = no_wait  # type: ignore[assignment]
    try:
        yield
    finally:
        device.joining.fetch_first_state = honest_first_state  # type: ignore[assignment]
        device.joining._wait_for_state = honest_wait  # type: ignore[assignment]


@contextmanager
def _joins_trust_first_genesis() -> Iterator[None]:
    """The join as it was before issue 14's finding 4: any well-formed genesis for the group
    id is taken, and every syncnode's answers extend one log, so the first syncnode to answer
    decides for all. Either defence alone stops the forging syncnode of the ``forge``
    scenario; this removes both, and its joins must then be caught never completing."""
    import device.joining
    from device.joining import _Log
    from proto.manifest import validate_genesis

    honest_log_of = device.joining._log_of
    honest_genesis_of = device.joining._genesis_of

    def shared(logs: dict[bytes, _Log], node_id: bytes) -> _Log:
        return logs.setdefault(b"", _Log())

    def unchecked(t: Any, raw: bytes) -> LogValue:
        g = LogValue.decode(raw)
        validate_genesis(t.group_id, g)
        return g

    device.joining._log_of = shared
    device.joining._genesis_of = unchecked
    try:
        yield
    finally:
        device.joining._log_of = honest_log_of
        device.joining._genesis_of = honest_genesis_of


@contextmanager
def _blind_witness() -> Iterator[None]:
    """Issue 17's detection removed: the statements are still signed and kept, nothing
    compares them."""
    from device.witness import Witness

    honest_check, honest_backfilled = Witness.check, Witness.backfilled

    async def no_check(self: Witness, client: Any) -> None:
        return None

    def no_backfill_check(self: Witness, *args: Any) -> None:
        return None

    Witness.check = no_check  # type: ignore[method-assign]
    Witness.backfilled = no_backfill_check  # type: ignore[method-assign]
    try:
        yield
    finally:
        Witness.check = honest_check  # type: ignore[method-assign]
        Witness.backfilled = honest_backfilled  # type: ignore[method-assign]


@contextmanager
def _no_reconcile() -> Iterator[None]:
    """Anti-entropy switched off (what a syncnode did before issue 17 for quiet groups)."""
    from syncnode.reconcile import Reconciler

    honest_round = Reconciler.round

    async def no_round(self: Reconciler) -> int:
        return 0

    Reconciler.round = no_round  # type: ignore[method-assign]
    try:
        yield
    finally:
        Reconciler.round = honest_round  # type: ignore[method-assign]


def _anyone(*args: Any) -> bool:
    return True


def _no_refusal(*args: Any) -> None:
    return None


def _no_reset(*_: Any) -> None:
    return None


_ROLE_BUGS: dict[str, tuple[tuple[str, str, Any], ...]] = {
    # (module, attribute, replacement): everywhere the rule is looked up by name
    "members-govern": (("proto.manifest", "_check_own_update", _no_refusal),
                       ("device.membership", "admin_refusal", _no_refusal)),
    "readers-send": (("proto.manifest", "may_send", _anyone),
                     ("device.replica", "may_send", _anyone),
                     ("device.inbox", "may_send", _anyone),
                     ("syncnode.envelopes", "may_send", _anyone)),
}


@contextmanager
def _patched(*patches: tuple[str, str, Any]) -> Iterator[None]:
    """Rule functions replaced where the code looks them up: the role rules as they were
    before issue 16 (any member governs; a reader's updates count), the witness's reset rule."""
    import importlib

    saved = []
    for module, name, replacement in patches:
        mod = importlib.import_module(module)
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, replacement)
    try:
        yield
    finally:
        for mod, name, original in saved:
            setattr(mod, name, original)


async def _no_sync(self: Any, through: int | None = None) -> None:
    """The bug: the send path returns at once, as if every commit were on disk."""

