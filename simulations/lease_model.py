"""What :mod:`simulations.lease_explorer` explores: the acceptor kinds (correct, Byzantine,
and the planted bugs), the configuration, the results, and the helpers that abstract and
describe the fast path's messages in states and traces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proto.paxos.acceptor import Acceptor, SlotState
from proto.paxos.messages import (
    Accept,
    Accepted,
    AcceptedLeased,
    AcceptLeased,
    AcceptorRecord,
    Ballot,
    Promise,
)
from simulations.paxos_explorer import Violation, YesManAcceptor, _describe


class LeaseLowersPromise(Acceptor):
    """Planted bug: the lease ignores a higher promise already made for the next slot."""

    def _lease(self, accept: Accept) -> tuple[tuple[AcceptorRecord, ...], Promise | None]:
        nxt = accept.slot + 1
        if self.state(accept.group_id, nxt).accepted is not None:
            return (), None
        rec = self._commit(accept.group_id, nxt, SlotState(accept.ballot, None))
        return (rec,), self._promise(accept.group_id, nxt, accept.ballot, None)


class LeaseForgettingAcceptor(Acceptor):
    """Planted bug: the lease promise is signed and sent but never kept (not in memory, not on
    disk). Also the syncnodes' acceptor under ``--break lease-forgets`` (the sweep)."""

    def _lease(self, accept: Accept) -> tuple[tuple[AcceptorRecord, ...], Promise | None]:
        return (), self._promise(accept.group_id, accept.slot + 1, accept.ballot, None)


class LeasingYesMan(YesManAcceptor):
    """Byzantine: besides signing any vote, promises any lease without keeping it."""

    def _lease(self, accept: Accept) -> tuple[tuple[AcceptorRecord, ...], Promise | None]:
        return (), self._promise(accept.group_id, accept.slot + 1, accept.ballot, None)


KINDS: dict[str, type[Acceptor]] = {
    "correct": Acceptor, "yes-man": LeasingYesMan, "lease-lowers-promise": LeaseLowersPromise,
    "lease-forgets": LeaseForgettingAcceptor}


@dataclass(frozen=True)
class LeaseConfig:
    rivals: int = 1
    acceptors: tuple[str, ...] = ("correct",) * 3
    max_rounds: int = 2
    """Rounds of the slot-1 proposers (the rivals, and the leader after its fast attempt)."""
    leader_rounds: int = 1
    """Rounds of the leader at slot 0 (more multiplies the states; the lease at a later
    ballot of slot 0 is the same mechanism)."""
    crashes: bool = True
    check_promises: bool = True
    expect_forks: bool = False
    max_states: int | None = None


@dataclass
class LeaseResult:
    config: LeaseConfig
    states: int = 0
    transitions: int = 0
    complete: bool = True
    seconds: float = 0.0
    violations: list[Violation] = field(default_factory=list)
    fast_paths: int = 0
    """States reached through the leader taking the fast path."""
    fast_decisions: int = 0
    """States in which slot 1 is chosen at the lease's ballot (a one-round-trip decision)."""
    decided_both: int = 0
    detected_forks: int = 0

    def summary(self) -> str:
        c = self.config
        v = f"{len(self.violations)} violation(s)" if self.violations else "no violations"
        return (f"lease: leader + {c.rivals} rival(s) x {list(c.acceptors)}, {c.leader_rounds}"
                f"/{c.max_rounds} rounds, crashes={'on' if c.crashes else 'off'}: "
                f"{self.states:,} states, "
                f"{self.transitions:,} transitions ({'complete' if self.complete else 'bounded'}"
                f", {self.seconds:.1f} s), {self.fast_paths:,} after a fast path, "
                f"{self.fast_decisions:,} with slot 1 chosen at the lease ballot, "
                f"{self.decided_both:,} with both slots chosen, {self.detected_forks:,} "
                f"detected forks; {v}")


def _rename(m: tuple[object, ...], perm: tuple[int, ...]) -> tuple[object, ...]:
    """An abstract message with its acceptor (Promises and votes: field 3) renamed."""
    if m[0] in (2, 3):
        return (*m[:3], perm[m[3]], *m[4:])  # type: ignore[index]
    return m


def _vote(m: object) -> Accepted:
    return m.accepted if isinstance(m, AcceptedLeased) else m  # type: ignore[return-value]


def _below(b: Ballot | None, promised: Ballot | None) -> bool:
    return promised is not None and (b is None or b < promised)


def _say(m: object) -> str:
    s = getattr(m, "slot", "?")
    if isinstance(m, AcceptLeased):
        return f"s{s}:AcceptLeased{_describe(m.accept)[6:]}"
    if isinstance(m, AcceptedLeased):
        return (f"s{s}:{_describe(m.accepted)}"
                + ("+lease" if m.lease is not None else "+no lease"))
    return f"s{s}:{_describe(m)}"
