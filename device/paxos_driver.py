"""Driving the sans-IO :class:`~proto.paxos.proposer.Proposer` over syncnode connections.

One call to :func:`propose` runs Paxos for one slot against the group's syncnodes: send
Prepare to each, feed the replies, send Accept, until the proposer reaches an outcome. Contention
(a Nack, or too few replies) backs off for a random, exponentially growing time, so competing
devices stop colliding. A syncnode that already decided the slot answers with the decision,
which ends the attempt at once.

**A minority never sets the pace.** Every phase ends as soon as the proposer has its quorum
outcome (a quorum of Promises, a quorum of Accepteds, or one verified Decided): each request runs
in its own task and its reply is fed to the proposer when it comes, so a syncnode that is down,
frozen or slow is simply not waited for. Its request is left running (bounded by ``timeout``)
until :func:`propose` returns, and a late reply is still fed to the proposer (the sans-IO core
ignores what no longer matters: an old ballot, a phase already done); only when no quorum
answers does a phase last its full ``timeout``. Each ballot asks the syncnodes linked *now*
(``clients`` may be a function), so a link that reconnects during an attempt is used by the
next ballot. A won decision is then sent to the syncnodes; :func:`propose` returns once a quorum
of them stored it, and the others get it in ``background`` (or are waited for, bounded, when
the caller has no background nursery).

**Fast path.** With a :class:`LeaseBook`, phase 2 asks the acceptors to promise the ballot for
the next slot too (:class:`~proto.paxos.messages.AcceptLeased`), and the promises that come back
with the decision are kept in the book; the next :func:`propose` for that slot starts with
them, and when they are a quorum of the slot's acceptors it sends Accept at once: one round
trip and one fsync per acceptor instead of two. Any other proposer's higher Prepare breaks the
lease (its Accept is Nacked, or its value reported to the rival), and the attempt falls back to
the full protocol with a higher ballot. The book is memory only, so a restart loses the lease
and with it nothing but speed.

**Thrifty Accept.** On a lease the Accept goes only to the acceptors whose promises make the
lease (a quorum, those that answered first last time), and to the others only when those have
not decided it within a few times the group's last ballot (:meth:`LeaseBook.patience`). Phase 2
may ask any acceptors, so this is as safe as asking all; it spares the others an fsync and a
signed reply per decision, and the proposer their replies. A lease holder that is down costs one
decision that wait: the lease the fallback brings comes from the acceptors that answered.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from proto import entropy
from proto.errors import SyncnodeError
from proto.identity import SecretKey
from proto.logs import get_logger
from proto.paxos.messages import (
    Accepted,
    AcceptedLeased,
    Decided,
    Lease,
    Nack,
    PaxosRejected,
    Prepare,
    Promise,
    value_hash,
)
from proto.paxos.proposer import Lost, Outcome, Phase, Proposer
from proto.paxos.quorum import AcceptorSet, verify_certificate
from proto.rpc import SyncnodeClient
from proto.service import Done

log = get_logger("device.paxos")

REPLY_TIMEOUT = 5.0
THRIFTY_MIN = 0.02
THRIFTY_MAX = 1.0
THRIFTY_FACTOR = 3.0
"""A thrifty Accept asks the other acceptors too after ``THRIFTY_FACTOR`` times the group's
last ballot, within ``[THRIFTY_MIN, THRIFTY_MAX]`` seconds."""

Links = Sequence[SyncnodeClient] | Callable[[], Awaitable[Sequence[SyncnodeClient]]]
"""The syncnodes to ask: a fixed list, or an async function returning the ones linked now
(called at every ballot)."""

Spawn = Callable[..., None]
"""``nursery.start_soon``-like: runs ``fn(*args)`` in the background, beyond the call."""


class LeaseBook:
    """The leases one device holds: at most one per group, for the slot after its last
    decision. Taking a lease removes it, so a ballot it names is used for one value only.
    Also how long each group's last ballot took (the thrifty fast path's patience)."""

    def __init__(self) -> None:
        self._leases: dict[bytes, Lease] = {}
        self.took: dict[bytes, float] = {}
        """Seconds the last decided ballot of each group took."""
        self.fastest: dict[bytes, tuple[bytes, ...]] = {}
        """The acceptors in the order they answered the last decided ballot's last phase."""

    def holds(self, group_id: bytes, slot: int) -> bool:
        lease = self._leases.get(group_id)
        return lease is not None and lease.slot == slot

    def take(self, group_id: bytes, slot: int) -> Lease | None:
        lease = self._leases.pop(group_id, None)
        return lease if lease is not None and lease.slot == slot else None

    def keep(self, lease: Lease) -> None:
        self._leases[lease.group_id] = lease

    def patience(self, group_id: bytes) -> float:
        """How long a thrifty Accept waits for the lease holders before asking the others."""
        return min(THRIFTY_MAX, max(THRIFTY_MIN, THRIFTY_FACTOR * self.took.get(group_id, 0.0)))


class ProposeFailed(SyncnodeError):
    """No outcome within the attempt budget (no reachable quorum, or endless contention)."""


@dataclass(frozen=True)
class _Reply:
    phase: int
    node: bytes
    message: Any
    """What the syncnode answered; None when it failed or did not answer within the timeout."""


class _Requests:
    """Requests to syncnodes, each in its own task of one nursery; replies arrive, tagged with
    the phase that sent them, on one channel in the order they come."""

    def __init__(self, nursery: trio.Nursery, timeout: float) -> None:
        self.nursery = nursery
        self.timeout = timeout
        self.phase = 0
        self.asked = 0
        """How many syncnodes the current phase asked."""
        self.answered: list[bytes] = []
        """The syncnodes that answered the current phase, in the order they did."""
        self._send, self.replies = trio.open_memory_channel[_Reply](math.inf)

    def send(self, clients: Sequence[SyncnodeClient], msg: Any) -> None:
        """Start a new phase: ``msg`` to each of ``clients``."""
        self.phase += 1
        self.asked = 0
        self.answered = []
        self.more(clients, msg)

    def more(self, clients: Sequence[SyncnodeClient], msg: Any) -> None:
        """``msg`` to ``clients`` too, in the current phase."""
        self.asked += len(clients)
        for client in clients:
            self.nursery.start_soon(self._one, self.phase, client, msg)

    async def _one(self, phase: int, client: SyncnodeClient, msg: Any) -> None:
        reply = None
        with trio.move_on_after(self.timeout):
            try:
                reply = await client.request(msg)
            except SyncnodeError as exc:
                log.debug("syncnode did not answer", node=client.node_id.hex()[:10],
                          error=str(exc))
        if reply is not None and phase == self.phase:
            self.answered.append(client.node_id)
        self._send.send_nowait(_Reply(phase, client.node_id, reply))


async def propose(key: SecretKey, clients: Links, group_id: bytes, slot: int,
                  value: bytes, acceptors: AcceptorSet, *, attempts: int = 12,
                  backoff: float = 0.02, timeout: float = REPLY_TIMEOUT,
                  rng: random.Random | None = None, announce: bool = True,
                  background: Spawn | None = None, leases: LeaseBook | None = None,
                  before_announce: Callable[[], Awaitable[object]] | None = None) -> Outcome:
    """Run Paxos for ``(group_id, slot)`` proposing ``value``; return the outcome.

    ``Decided`` if ``value`` won, :class:`Lost` (with the winner) otherwise. Raises
    :class:`ProposeFailed` when no decision is reached in ``attempts`` ballots. ``timeout``
    bounds one phase when no quorum answers (with a quorum it ends at the quorum's pace). With
    ``announce`` (the default) a won decision is sent to the syncnodes before returning, and
    the call returns once a quorum stored it: the remaining ones finish in ``background``
    (each bounded by ``timeout``), or are awaited, bounded, when it is None. Without
    ``announce`` the caller does it with :func:`announce_decision`. With ``leases``, the
    fast path: a lease held for ``slot`` is spent on the first ballot, and the one this
    decision brings for ``slot + 1`` is kept there. ``before_announce`` is awaited between a
    won decision and its announce: work that ran alongside the ballot and must be done before
    anyone can learn the decision (the join's staged copy of the document).
    """
    rng = rng or entropy.rng()
    lease = leases.take(group_id, slot) if leases is not None else None
    proposer = Proposer(key, group_id, slot, value, acceptors, lease=lease,
                        want_lease=leases is not None)
    thrifty = None if lease is None or leases is None else _thrifty(leases, lease, acceptors)
    outcome: Outcome | None = None
    async with trio.open_nursery() as nursery:
        requests = _Requests(nursery, timeout)
        for attempt in range(attempts):
            started = trio.current_time()
            outcome = await _ballot(proposer, requests, await _targets(clients, acceptors),
                                    value, acceptors, thrifty)
            thrifty = None  # the lease is spent: a retry is a full ballot to every acceptor
            if outcome is not None:
                if leases is not None:
                    leases.took[group_id] = trio.current_time() - started
                    leases.fastest[group_id] = tuple(requests.answered)
                break
            await trio.sleep(rng.uniform(0, backoff * (2 ** min(attempt, 8))))
        if isinstance(outcome, Decided) and announce:
            if before_announce is not None:
                await before_announce()
            # Announced while the stragglers still run: a vote that comes late may still
            # bring a lease promise (when one of the quorum's votes brought none).
            await announce_decision(await _targets(clients, acceptors), outcome, timeout,
                                    quorum=acceptors.quorum, background=background)
            _late_votes(proposer, requests)
        nursery.cancel_scope.cancel()  # stragglers: their replies no longer matter
    if outcome is None:
        raise ProposeFailed(f"no decision for slot {slot} after {attempts} ballots")
    following = proposer.next_lease()
    if leases is not None and following is not None:
        leases.keep(following)
    return outcome


def _late_votes(proposer: Proposer, requests: _Requests) -> None:
    """Feed the replies that came after the outcome (the proposer keeps only lease promises
    of its own ballot from them)."""
    while True:
        try:
            reply = requests.replies.receive_nowait()
        except trio.WouldBlock:
            return
        if isinstance(reply.message, AcceptedLeased):
            proposer.receive(reply.message)


@dataclass(frozen=True)
class _Thrifty:
    """A lease's Accept goes to ``holders`` (a quorum), and to the other acceptors only if
    those have not decided it within ``patience`` seconds."""

    holders: frozenset[bytes]
    patience: float


def _thrifty(leases: LeaseBook, lease: Lease, acceptors: AcceptorSet) -> _Thrifty | None:
    """The quorum of the lease's acceptors that answered the group's last ballot first."""
    promised = {p.acceptor for p in lease.promises}
    near = [n for n in leases.fastest.get(lease.group_id, ()) if n in promised]
    near = near[:acceptors.quorum]
    if len(near) < acceptors.quorum:
        return None
    return _Thrifty(frozenset(near), leases.patience(lease.group_id))


async def _ballot(proposer: Proposer, requests: _Requests, clients: Sequence[SyncnodeClient],
                  value: bytes, acceptors: AcceptorSet, thrifty: _Thrifty | None = None
                  ) -> Outcome | None:
    """One ballot (both phases, or phase 2 alone on a lease); None when it ended without an
    outcome (retry)."""
    accepts: list[Any] = []
    first = proposer.start()[0]
    if isinstance(first, Prepare):
        requests.send(clients, first)
        outcome = await _gather(proposer, requests, value, acceptors, accepts.extend,
                                lambda: bool(accepts) or proposer.phase is not Phase.PREPARING)
        if outcome is not None or not accepts:
            return outcome
    else:
        accepts.append(first)  # the fast path: phase 1 was done with the previous slot
    near = [c for c in clients if thrifty is not None and c.node_id in thrifty.holders]
    rest: Sequence[SyncnodeClient] = ()
    if thrifty is not None and acceptors.quorum <= len(near) < len(clients):
        requests.send(near, accepts[0])
        rest = [c for c in clients if c not in near]
    else:
        requests.send(clients, accepts[0])

    def fall_back() -> None:
        """The lease holders did not decide the thrifty Accept in time: ask the others too."""
        assert thrifty is not None
        log.info("lease holders slow; asking every acceptor", waited=thrifty.patience)
        requests.more(rest, accepts[0])

    return await _gather(proposer, requests, value, acceptors, accepts.extend,
                         lambda: proposer.phase is not Phase.ACCEPTING,
                         (trio.current_time() + thrifty.patience, fall_back)
                         if rest and thrifty is not None else None)


async def _gather(proposer: Proposer, requests: _Requests, value: bytes,
                  acceptors: AcceptorSet, on_messages: Callable[[list[Any]], None],
                  phase_over: Callable[[], bool],
                  fallback: tuple[float, Callable[[], None]] | None = None) -> Outcome | None:
    """Feed replies to the proposer until the phase is over (its quorum outcome, or a Nack),
    every syncnode asked in this phase answered, or ``timeout``. ``fallback``: at that time,
    if the phase is still on, call that (a thrifty Accept asks the other acceptors). Returns
    an outcome the proposer reached or a syncnode's verified decision; None otherwise."""
    answered = 0
    with trio.move_on_after(requests.timeout):
        while answered < requests.asked:
            with trio.move_on_at(math.inf if fallback is None else fallback[0]) as wait:
                reply = await requests.replies.receive()
            if wait.cancelled_caught:
                assert fallback is not None
                fallback[1]()
                fallback = None
                continue
            answered += reply.phase == requests.phase
            msg = reply.message
            done = _already_decided(msg, value, acceptors)
            if done is not None:
                return done
            if isinstance(msg, Promise | Accepted | AcceptedLeased | Nack):
                on_messages(proposer.receive(msg))
            elif isinstance(msg, PaxosRejected):
                log.info("paxos request rejected", node=reply.node.hex()[:10],
                         reason=msg.reason, rule=msg.rule, detail=msg.detail)
            if proposer.outcome is not None:
                return proposer.outcome
            if phase_over():
                return None
    return proposer.outcome


async def _targets(clients: Links, acceptors: AcceptorSet) -> list[SyncnodeClient]:
    """The linked syncnodes that are acceptors of the slot, one client per node."""
    current = clients if isinstance(clients, Sequence) else await clients()
    out: dict[bytes, SyncnodeClient] = {}
    for c in current:
        if c.node_id in acceptors:
            out.setdefault(c.node_id, c)
    return list(out.values())


async def announce_decision(clients: Sequence[SyncnodeClient], decided: Decided,
                            timeout: float = REPLY_TIMEOUT, *, quorum: int | None = None,
                            background: Spawn | None = None) -> None:
    """Send a decision with its certificate to the syncnodes (they verify and store it).

    With ``quorum``, return once that many stored it; the others continue in ``background``
    (each bounded by ``timeout``), or are awaited, bounded, when it is None. Without, wait for
    every one (each bounded by ``timeout``)."""
    stored = finished = 0
    enough = trio.Event()

    async def one(client: SyncnodeClient) -> None:
        nonlocal stored, finished
        try:
            with trio.move_on_after(timeout):
                reply = await client.request(decided)
                stored += isinstance(reply, Done)
        except SyncnodeError as exc:
            log.debug("syncnode did not take the decision", node=client.node_id.hex()[:10],
                      error=str(exc))
        finally:
            finished += 1
            if stored >= (quorum or len(clients)) or finished == len(clients):
                enough.set()

    if quorum is not None and background is not None and clients:
        for c in clients:
            background(one, c)
        await enough.wait()  # bounded: each request ends within ``timeout``
        return
    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(one, c)


def _already_decided(reply: Any, value: bytes, acceptors: AcceptorSet) -> Outcome | None:
    """A syncnode's answer that the slot is already decided, as an outcome (if it verifies)."""
    if not isinstance(reply, Decided):
        return None
    try:
        verify_certificate(reply.certificate, acceptors)
    except SyncnodeError:
        return None
    if value_hash(reply.value) != reply.certificate.value_hash:
        return None
    if reply.value == value:
        return reply
    return Lost(reply.value, reply.certificate)
