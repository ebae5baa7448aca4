"""Driving the sans-IO :class:`~proto.paxos.proposer.Proposer` over syncnode connections.

One call to :func:`propose` runs Paxos for one slot against the group's syncnodes: broadcast
Prepare, feed the replies, broadcast Accept, until the proposer reaches an outcome. Contention
(a Nack, or too few replies) backs off for a random, exponentially growing time, so competing
devices stop colliding. A syncnode that already decided the slot answers with the decision,
which ends the attempt at once. Once decided, the certificate is sent to every syncnode so they
all serve it (a syncnode that misses it catches up from its peers).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import trio

from proto import entropy
from proto.errors import SyncnodeError
from proto.identity import SecretKey
from proto.logs import get_logger
from proto.paxos.messages import Accepted, Decided, Nack, PaxosRejected, Promise, value_hash
from proto.paxos.proposer import Lost, Outcome, Proposer
from proto.paxos.quorum import AcceptorSet, verify_certificate
from proto.rpc import SyncnodeClient

log = get_logger("device.paxos")

REPLY_TIMEOUT = 5.0


class ProposeFailed(SyncnodeError):
    """No outcome within the attempt budget (no reachable quorum, or endless contention)."""


async def _broadcast(clients: Sequence[SyncnodeClient], msg: Any, timeout: float) -> list[Any]:
    replies: list[Any] = []

    async def one(client: SyncnodeClient) -> None:
        with trio.move_on_after(timeout):
            try:
                replies.append(await client.request(msg))
            except SyncnodeError as exc:
                log.debug("syncnode did not answer", node=client.node_id.hex()[:10],
                          error=str(exc))

    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(one, c)
    return replies


async def propose(key: SecretKey, clients: Sequence[SyncnodeClient], group_id: bytes, slot: int,
                  value: bytes, acceptors: AcceptorSet, *, attempts: int = 12,
                  backoff: float = 0.02, timeout: float = REPLY_TIMEOUT,
                  rng: random.Random | None = None, announce: bool = True) -> Outcome:
    """Run Paxos for ``(group_id, slot)`` proposing ``value``; return the outcome.

    ``Decided`` if ``value`` won, :class:`Lost` (with the winner) otherwise. Raises
    :class:`ProposeFailed` when no decision is reached in ``attempts`` ballots. With
    ``announce`` (the default) a won decision is sent to every syncnode before returning;
    otherwise the caller does it with :func:`announce_decision`.
    """
    rng = rng or entropy.rng()
    proposer = Proposer(key, group_id, slot, value, acceptors)
    for attempt in range(attempts):
        prepare = proposer.start()[0]
        accepts: list[Any] = []
        for reply in await _broadcast(clients, prepare, timeout):
            done = _already_decided(reply, value, acceptors)
            if done is not None:
                return done
            if isinstance(reply, Promise | Nack):
                accepts += proposer.receive(reply)
            elif isinstance(reply, PaxosRejected):
                log.info("prepare rejected", reason=reply.reason, detail=reply.detail)
        if accepts:
            for reply in await _broadcast(clients, accepts[0], timeout):
                done = _already_decided(reply, value, acceptors)
                if done is not None:
                    return done
                if isinstance(reply, Accepted | Nack):
                    proposer.receive(reply)
                elif isinstance(reply, PaxosRejected):
                    log.info("accept rejected", reason=reply.reason, rule=reply.rule,
                             detail=reply.detail)
        if proposer.outcome is not None:
            outcome = proposer.outcome
            if isinstance(outcome, Decided) and announce:
                await announce_decision(clients, outcome, timeout)
            return outcome
        await trio.sleep(rng.uniform(0, backoff * (2 ** min(attempt, 8))))
    raise ProposeFailed(f"no decision for slot {slot} after {attempts} ballots")


async def announce_decision(clients: Sequence[SyncnodeClient], decided: Decided,
                            timeout: float = REPLY_TIMEOUT) -> None:
    """Send a decision with its certificate to every syncnode (they verify and store it)."""
    await _broadcast(clients, decided, timeout)


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
