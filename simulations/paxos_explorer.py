"""Exhaustive state-space exploration of the real Paxos core (one slot).

The explorer drives the production classes (:class:`proto.paxos.acceptor.Acceptor`,
:class:`proto.paxos.proposer.Proposer`, :class:`proto.paxos.learner.Learner`) with real Ed25519
signatures, and enumerates **every** interleaving of:

* message delivery in any order: the network is the set of messages ever sent, and any of them
  can be delivered to its addressee at any time, any number of times. This one rule covers loss
  (never delivered), duplication (delivered again) and reordering;
* proposer timeouts (a new round, up to ``max_rounds`` per proposer);
* acceptor crash-restart: in-memory state is replaced by what the acceptor persisted.

Visited states are deduplicated. In every state it checks:

1. **agreement** - at most one value has a quorum of Accepteds (at any one ballot);
2. **validity** - a chosen value was proposed by some proposer;
3. **no accept below promise** - an acceptor never votes for a ballot below the one it promised;
4. **certificates** - every certificate a learner can form from the Accepteds sent so far
   verifies against the acceptor set, and conflicting ones surface as an EquivocationProof;
5. proposer outcomes agree with what was chosen.

Acceptor variants plug in to show the checker bites (:class:`ForgetfulAcceptor`, which skips
persisting promises) and to study Byzantine acceptors (:class:`YesManAcceptor`).

Signatures are memoised while exploring (Ed25519 is deterministic, so this changes no outcome).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

from proto import identity
from proto.identity import SecretKey, fingerprint
from proto.paxos.acceptor import Acceptor, SlotState, Step
from proto.paxos.learner import Decision, Learner
from proto.paxos.messages import (
    Accept,
    Accepted,
    AcceptedValue,
    Ballot,
    EquivocationProof,
    Nack,
    Prepare,
    Promise,
    value_hash,
)
from proto.paxos.proposer import Lost, Phase, Proposer
from proto.paxos.quorum import AcceptorSet, CertificateError, verify_certificate

GROUP = b"explored-group"
SLOT = 0


# -- acceptor variants -------------------------------------------------------------------------


class ForgetfulAcceptor(Acceptor):
    """Broken on purpose: promises are kept in memory but never persisted, so a crash-restart
    forgets them. The explorer must find an agreement violation with this variant."""

    def handle_prepare(self, msg: Prepare) -> Step:
        step = super().handle_prepare(msg)
        return Step((), step.reply)


class YesManAcceptor(Acceptor):
    """Byzantine: signs whatever it is asked. Promises every ballot claiming it accepted nothing,
    and accepts every value at any ballot, ignoring its promises."""

    def handle_prepare(self, msg: Prepare) -> Step:
        return Step((), self._promise(msg.group_id, msg.slot, msg.ballot, None))

    def handle_accept(self, msg: Accept) -> Step:
        return Step((), self._accepted(msg.group_id, msg.slot, msg.ballot, msg.value))


ACCEPTOR_KINDS: dict[str, type[Acceptor]] = {
    "correct": Acceptor, "forgetful": ForgetfulAcceptor, "yes-man": YesManAcceptor,
}


# -- configuration and results -----------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    proposers: int = 2
    acceptors: tuple[str, ...] = ("correct", "correct", "correct")
    max_rounds: int = 3
    crashes: bool = True
    max_states: int | None = None
    """Stop after this many distinct states (None: explore everything)."""
    max_seconds: float | None = None
    expect_forks: bool = False
    """Byzantine runs: two chosen values are allowed if, and only if, the learner raised an
    EquivocationProof (the fork is detected, not silent)."""


@dataclass
class Violation:
    invariant: str
    detail: str
    trace: list[str]


@dataclass
class Result:
    config: Config
    states: int = 0
    transitions: int = 0
    complete: bool = True
    seconds: float = 0.0
    violations: list[Violation] = field(default_factory=list)
    decided_states: int = 0
    """States in which some value is chosen (shows the exploration reaches decisions)."""
    equivocation_proofs: int = 0
    """States in which conflicting certificates exist and the learner raised a proof."""
    detected_forks: int = 0
    """States with two chosen values (allowed only with ``expect_forks``, and only detected)."""
    first_fork_trace: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.config
        status = "complete" if self.complete else "bounded"
        v = f"{len(self.violations)} violation(s)" if self.violations else "no violations"
        return (f"{c.proposers} proposers x {len(c.acceptors)} acceptors {list(c.acceptors)}, "
                f"{c.max_rounds} rounds, crashes={'on' if c.crashes else 'off'}: "
                f"{self.states:,} distinct states, {self.transitions:,} transitions ({status}, "
                f"{self.seconds:.1f} s), {self.decided_states:,} with a decision, "
                f"{self.equivocation_proofs:,} with an equivocation proof "
                f"({self.detected_forks:,} detected forks); {v}")


@contextmanager
def memoised_signatures() -> Iterator[None]:
    real_sign, real_verify = identity._ed25519_sign, identity._ed25519_verify
    identity._ed25519_sign = lru_cache(maxsize=None)(real_sign)  # type: ignore[assignment]
    identity._ed25519_verify = lru_cache(maxsize=None)(real_verify)  # type: ignore[assignment]
    try:
        yield
    finally:
        identity._ed25519_sign, identity._ed25519_verify = real_sign, real_verify


# -- the explorer ------------------------------------------------------------------------------

_PHASES = {phase: i for i, phase in enumerate(Phase)}

# State: (acceptor memory, acceptor persisted, proposers, network). Messages are interned: the
# network is a frozenset of message numbers, and every transition is cached by its inputs (the
# cores are deterministic), so each distinct delivery runs the real code once.
AcceptorPart = tuple[SlotState, SlotState]


@dataclass
class _Node:
    acceptors: tuple[AcceptorPart, ...]
    proposers: tuple[Proposer, ...]
    net: frozenset[int]


class Explorer:
    def __init__(self, config: Config) -> None:
        self.config = config
        n_acc = len(config.acceptors)
        self.acceptor_keys = [SecretKey(bytes([0xA0 + i]) * 32) for i in range(n_acc)]
        self.acceptor_set = AcceptorSet(frozenset(k.public for k in self.acceptor_keys))
        self.proposer_keys = [SecretKey(bytes([0x10 + i]) * 32) for i in range(config.proposers)]
        self.members = {fingerprint(k.public): k.public for k in self.proposer_keys}
        self.values = [f"value-{i}".encode() for i in range(config.proposers)]
        self.value_hashes = {value_hash(v) for v in self.values}
        self.by_fpr = {fingerprint(k.public): i for i, k in enumerate(self.proposer_keys)}
        self.acceptor_index = {k.public: i for i, k in enumerate(self.acceptor_keys)}
        self.value_index: dict[bytes, int] = {}
        self.hash_index = {value_hash(v): i for i, v in enumerate(self.values)}
        for v in self.values:
            self._abs_value(v)
        # permutations that only swap acceptors of the same kind (symmetry reduction)
        kinds = config.acceptors
        self.perms = [perm for perm in itertools.permutations(range(n_acc))
                      if all(kinds[perm[i]] == kinds[i] for i in range(n_acc))]
        self.msgs: list[object] = []
        self._ids: dict[object, int] = {}
        self._abs: list[list[tuple[object, ...]]] = []
        self._cert_cache: dict[frozenset[int], tuple[int, str | None]] = {}
        self._outcome_cache: dict[tuple[object, ...], str | None] = {}
        self._acceptor_steps: dict[tuple[int, SlotState, int], tuple[SlotState, SlotState | None,
                                                                      int, str | None]] = {}
        self._proposer_steps: dict[tuple[object, ...], tuple[Proposer, tuple[int, ...]]] = {}

    # -- messages ----------------------------------------------------------------------------

    def _intern(self, m: object) -> int:
        i = self._ids.get(m)
        if i is None:
            i = len(self.msgs)
            self._ids[m] = i
            self.msgs.append(m)
            self._abs.append([self._abs_msg(m, perm) for perm in self.perms])
        return i

    def _abs_ballot(self, b: Ballot | None) -> tuple[int, int]:
        return (-1, -1) if b is None else (b.round, self.by_fpr[b.proposer])

    def _abs_value(self, v: bytes | None) -> int:
        return -1 if v is None else self.value_index.setdefault(v, len(self.value_index))

    def _abs_accepted(self, acc: AcceptedValue | None) -> tuple[object, ...]:
        return (((-1, -1), -1) if acc is None
                else (self._abs_ballot(acc.ballot), self._abs_value(acc.value)))

    def _abs_msg(self, m: object, perm: tuple[int, ...]) -> tuple[object, ...]:
        if isinstance(m, Prepare):
            return (0, self._abs_ballot(m.ballot))
        if isinstance(m, Accept):
            return (1, self._abs_ballot(m.ballot), self._abs_value(m.value))
        if isinstance(m, Promise):
            return (2, self._abs_ballot(m.ballot), perm[self.acceptor_index[m.acceptor]],
                    self._abs_accepted(m.accepted))
        if isinstance(m, Accepted):
            return (3, self._abs_ballot(m.ballot), perm[self.acceptor_index[m.acceptor]],
                    self.hash_index.get(m.value_hash, -1))
        if isinstance(m, Nack):
            return (4, self._abs_ballot(m.ballot), perm[self.acceptor_index[m.acceptor]])
        raise TypeError(type(m))

    def key(self, node: _Node) -> tuple[object, ...]:
        """Canonical state key: abstract (indices instead of keys and signatures) and the
        smallest renaming of interchangeable acceptors (symmetry reduction)."""
        props = tuple((p.round, p._next_round, _PHASES[p.phase], self._abs_value(p.proposal))
                      for p in node.proposers)
        accs = [((self._abs_ballot(m.promised), self._abs_accepted(m.accepted)),
                 (self._abs_ballot(pst.promised), self._abs_accepted(pst.accepted)))
                for m, pst in node.acceptors]
        # Accepteds never cause a transition; they only feed the invariants. Once the Accept of
        # a ballot is gone from the network (dead, or never sent) its vote set is final, and
        # all that matters of it is whether it reached a quorum (its value is then chosen;
        # every certificate it yields was verified when it formed). So the key keeps votes
        # only for ballots that can still gain votes, plus the final "chosen" ballots.
        open_ballots = {self.msgs[m].ballot for m in node.net  # type: ignore[attr-defined]
                        if isinstance(self.msgs[m], Accept)}
        frozen: dict[tuple[object, bytes], int] = {}
        live_ids = []
        for m in node.net:
            msg = self.msgs[m]
            if isinstance(msg, Accepted) and msg.ballot not in open_ballots:
                k = (msg.ballot, msg.value_hash)
                frozen[k] = frozen.get(k, 0) + 1
            else:
                live_ids.append(m)
        chosen = tuple(sorted((self._abs_ballot(b), self.hash_index.get(h, -1))
                              for (b, h), n in frozen.items()
                              if n >= self.acceptor_set.quorum))  # type: ignore[arg-type]
        keys = []
        for pi, perm in enumerate(self.perms):
            renamed: list[object] = [None] * len(accs)
            for i, a in enumerate(accs):
                renamed[perm[i]] = a
            net = tuple(sorted(self._abs[m][pi] for m in live_ids))
            keys.append((tuple(renamed), props, net, chosen))
        return min(keys)  # type: ignore[type-var]

    # -- the real cores ----------------------------------------------------------------------

    def _acceptors_for(self, group: bytes, slot: int) -> AcceptorSet | None:
        return self.acceptor_set if (group, slot) == (GROUP, SLOT) else None

    def _proposer_key_for(self, group: bytes, slot: int, fpr: bytes) -> bytes | None:
        return self.members.get(fpr)

    def _acceptor_step(self, a: int, mem: SlotState, msg_id: int
                       ) -> tuple[SlotState, SlotState | None, int, str | None]:
        """Deliver a request to acceptor ``a`` in memory state ``mem`` (cached)."""
        key = (a, mem, msg_id)
        hit = self._acceptor_steps.get(key)
        if hit is not None:
            return hit
        cls = ACCEPTOR_KINDS[self.config.acceptors[a]]
        acc = cls(self.acceptor_keys[a], self._acceptors_for, self._proposer_key_for,
                  {(GROUP, SLOT): mem})
        msg = self.msgs[msg_id]
        assert isinstance(msg, Prepare | Accept)
        step = acc.handle(msg)
        persisted = None
        for rec in step.persist:
            persisted = SlotState(rec.promised, rec.accepted)
        violation = None
        if (isinstance(step.reply, Accepted) and mem.promised is not None
                and step.reply.ballot < mem.promised and self.config.acceptors[a] != "yes-man"):
            violation = f"A{a} accepted {step.reply.ballot} after promising {mem.promised}"
        result = (acc.state(GROUP, SLOT), persisted, self._intern(step.reply), violation)
        self._acceptor_steps[key] = result
        return result

    def _proposer_step(self, i: int, p: Proposer, action: str, inputs: tuple[int, ...]
                       ) -> tuple[Proposer, tuple[int, ...]]:
        """Clone proposer ``i`` and apply ``action`` (retry, or receive ``inputs``) (cached)."""
        key = (i, p.snapshot(), action, inputs)
        hit = self._proposer_steps.get(key)
        if hit is not None:
            return hit
        q = p.clone()
        out: list[object] = []
        if action == "retry":
            out.extend(q.retry())
        else:
            for m in inputs:
                msg = self.msgs[m]
                assert isinstance(msg, Promise | Accepted | Nack)
                out.extend(q.receive(msg))
        result = (q, tuple(self._intern(m) for m in out))
        self._proposer_steps[key] = result
        return result

    # -- the state graph ---------------------------------------------------------------------

    def initial(self) -> _Node:
        proposers = []
        net: set[int] = set()
        for key, value in zip(self.proposer_keys, self.values, strict=True):
            p = Proposer(key, GROUP, SLOT, value, self.acceptor_set)
            net.update(self._intern(m) for m in p.start())
            proposers.append(p)
        empty = SlotState()
        return _Node(tuple((empty, empty) for _ in self.acceptor_keys), tuple(proposers),
                     frozenset(net))

    def successors(self, node: _Node) -> Iterator[tuple[str, _Node, Violation | None]]:
        cfg = self.config
        # proposer timeouts
        for i, p in enumerate(node.proposers):
            if p.phase is not Phase.DONE and p.round < cfg.max_rounds:
                q, out = self._proposer_step(i, p, "retry", ())
                yield (f"P{i} times out -> round {q.round}",
                       self._node(node.acceptors, _replace(node.proposers, i, q),
                                  node.net.union(out)), None)
        # acceptor crash-restart
        if cfg.crashes:
            for a, (mem, persisted) in enumerate(node.acceptors):
                if mem != persisted:
                    yield (f"A{a} crashes and restarts",
                           _Node(_replace(node.acceptors, a, (persisted, persisted)),
                                 node.proposers, node.net), None)
        # deliveries of requests to acceptors
        for m in sorted(node.net):
            msg = self.msgs[m]
            if not isinstance(msg, Prepare | Accept):
                continue
            for a, (mem, persisted) in enumerate(node.acceptors):
                new_mem, new_persisted, reply, problem = self._acceptor_step(a, mem, m)
                if new_persisted is None:
                    new_persisted = persisted
                child = self._node(_replace(node.acceptors, a, (new_mem, new_persisted)),
                                   node.proposers, node.net | {reply})
                if child.acceptors == node.acceptors and child.net == node.net:
                    continue
                violation = Violation("no-accept-below-promise", problem, []) if problem else None
                yield (f"A{a} <- {_describe(msg)} -> {_describe(self.msgs[reply])}", child,
                       violation)
        # proposers: phase 2 once a quorum of promises is in the network (delivered together:
        # a proposer holding fewer promises sends nothing, so the partial states add nothing)
        for i, p in enumerate(node.proposers):
            if p.phase is not Phase.PREPARING:
                continue
            promises = sorted(m for m in node.net if isinstance(self.msgs[m], Promise)
                              and self.msgs[m].ballot == p.ballot)  # type: ignore[attr-defined]
            for quorum in itertools.combinations(promises, self.acceptor_set.quorum):
                q, out = self._proposer_step(i, p, "receive", quorum)
                if not out:
                    continue
                yield (f"P{i} <- {', '.join(_describe(self.msgs[m]) for m in quorum)} -> "
                       f"{', '.join(_describe(self.msgs[m]) for m in out)}",
                       self._node(node.acceptors, _replace(node.proposers, i, q),
                                  node.net.union(out)), None)

    def _node(self, acceptors: tuple[AcceptorPart, ...], proposers: tuple[Proposer, ...],
              net: frozenset[int]) -> _Node:
        """Build a state, dropping messages that can no longer cause any transition: Promises
        for a ballot its proposer has left (proposers never revisit a ballot), requests below
        every acceptor's promise, and Nacks.

        Nacks only make a proposer back off and retry, which its timeout transition already
        covers (with a subset of the rounds a Nack could make it skip to), so dropping them
        loses no behaviour. The Nack path is exercised by the random-schedule tests instead.
        """
        live = {p.ballot for p in proposers if p.phase is Phase.PREPARING}
        # A request below the promise of every acceptor can only draw Nacks from now on
        # (including after a crash-restart, hence the persisted promise too): it is dead.
        # Acceptors that ignore promises (yes-man) keep every request alive.
        floor: Ballot | None = None
        if "yes-man" not in self.config.acceptors:
            promised = [b for mem, pst in acceptors for b in (mem.promised, pst.promised)]
            if all(b is not None for b in promised):
                floor = min(promised)  # type: ignore[type-var]

        def alive(m: int) -> bool:
            msg = self.msgs[m]
            if isinstance(msg, Promise):
                return msg.ballot in live
            if isinstance(msg, Prepare | Accept):
                return floor is None or not msg.ballot < floor
            return not isinstance(msg, Nack)

        return _Node(acceptors, proposers, frozenset(m for m in net if alive(m)))

    def check(self, node: _Node) -> tuple[Violation | None, bool, bool]:
        """Invariants of one state. Returns (violation, some value chosen, proof raised)."""
        accepted = frozenset(m for m in node.net if isinstance(self.msgs[m], Accepted))
        votes: dict[tuple[object, bytes], set[bytes]] = {}
        for i in accepted:
            m = self.msgs[i]
            assert isinstance(m, Accepted)
            votes.setdefault((m.ballot, m.value_hash), set()).add(m.acceptor)
        chosen = {h for (_, h), accs in votes.items() if len(accs) >= self.acceptor_set.quorum}
        proof_raised = False
        if accepted:
            n_proofs, cert_problem = self._learn_all(accepted)
            if cert_problem:
                return Violation("certificates", cert_problem, []), bool(chosen), False
            proof_raised = n_proofs > 0
        if len(chosen) > 1 and not (self.config.expect_forks and proof_raised):
            return (Violation("agreement", f"{len(chosen)} different values chosen "
                              f"(equivocation proof raised: {proof_raised})", []),
                    True, proof_raised)
        if chosen - self.value_hashes:
            return Violation("validity", "a value nobody proposed was chosen", []), True, False
        for i, p in enumerate(node.proposers):
            problem = self._proposer_outcome(i, p, accepted, chosen)
            if problem:
                return Violation("proposer-outcome", problem, []), bool(chosen), proof_raised
        return None, bool(chosen), proof_raised

    def _proposer_outcome(self, i: int, p: Proposer, accepted: frozenset[int],
                          chosen: set[bytes]) -> str | None:
        """Deliver every Accepted sent so far to (a copy of) the proposer; what it reports must
        match what is chosen. (Accepteds reach proposers here rather than as transitions: they
        only ever end a proposer, so this sees every outcome with far fewer states.)"""
        key = (i, p.snapshot(), accepted)
        if key in self._outcome_cache:
            return self._outcome_cache[key]
        q = p.clone()
        problem = None
        for mi in sorted(accepted):
            m = self.msgs[mi]
            assert isinstance(m, Accepted)
            q.receive(m)
            outcome = q.outcome
            if outcome is None or isinstance(outcome, EquivocationProof):
                continue
            h = outcome.certificate.value_hash
            if h not in chosen:
                problem = f"P{i} reports {type(outcome).__name__} for a value not chosen"
            elif isinstance(outcome, Lost) and h == value_hash(p.own_value):
                problem = f"P{i} reports Lost although its own value was chosen"
            elif not isinstance(outcome, Lost) and h != value_hash(p.own_value):
                problem = f"P{i} reports Decided for another proposer's value"
            break
        self._outcome_cache[key] = problem
        return problem

    def _learn_all(self, accepted: frozenset[int]) -> tuple[int, str | None]:
        """Feed every Accepted sent so far to a fresh real Learner; verify what it forms."""
        cached = self._cert_cache.get(accepted)
        if cached is not None:
            return cached
        learner = Learner(self._acceptors_for)
        problem = None
        for mi in sorted(accepted):
            m = self.msgs[mi]
            assert isinstance(m, Accepted)
            event = learner.on_accepted(m)
            certs = []
            if isinstance(event, Decision):
                certs = [event.certificate]
            elif isinstance(event, EquivocationProof):
                certs = [event.first, event.second]
            for cert in certs:
                try:
                    verify_certificate(cert, self.acceptor_set)
                except CertificateError as exc:
                    problem = f"learner formed a certificate that does not verify: {exc}"
        result = (len(learner.proofs), problem)
        self._cert_cache[accepted] = result
        return result

    def run(self, *, stop_at_first: bool = True,
            progress: Callable[[Result], None] | None = None) -> Result:
        cfg = self.config
        result = Result(cfg)
        start = time.perf_counter()
        with memoised_signatures():
            root = self.initial()
            parents: dict[tuple[object, ...], tuple[tuple[object, ...] | None, str]] = {
                self.key(root): (None, "start: every proposer sends Prepare(round 1)")}
            queue = deque([root])
            while queue:
                node = queue.popleft()
                node_key = self.key(node)
                for action, child, step_violation in self.successors(node):
                    result.transitions += 1
                    key = self.key(child)
                    if key in parents:
                        continue
                    parents[key] = (node_key, action)
                    result.states += 1
                    violation, decided, proof = self.check(child)
                    violation = step_violation or violation
                    result.decided_states += decided
                    result.equivocation_proofs += proof
                    if proof and violation is None:
                        result.detected_forks += 1
                        if not result.first_fork_trace:
                            result.first_fork_trace = _trace(parents, key)
                    if violation is not None:
                        violation.trace = _trace(parents, key)
                        result.violations.append(violation)
                        if stop_at_first:
                            result.seconds = time.perf_counter() - start
                            return result
                    queue.append(child)
                    if cfg.max_states is not None and result.states >= cfg.max_states:
                        result.complete = False
                        queue.clear()
                        break
                    if progress is not None and result.states % 50_000 == 0:
                        result.seconds = time.perf_counter() - start
                        progress(result)
                if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
                    result.complete = not queue
                    break
        result.seconds = time.perf_counter() - start
        return result


def _replace(items: tuple, i: int, value: object) -> tuple:  # type: ignore[type-arg]
    return (*items[:i], value, *items[i + 1:])


def _trace(parents: dict[tuple[object, ...], tuple[tuple[object, ...] | None, str]],
           key: tuple[object, ...]) -> list[str]:
    steps = []
    cur: tuple[object, ...] | None = key
    while cur is not None:
        parent, action = parents[cur]
        steps.append(action)
        cur = parent
    return steps[::-1]


def _describe(m: object) -> str:
    if isinstance(m, Prepare):
        return f"Prepare{_b(m.ballot)}"
    if isinstance(m, Accept):
        return f"Accept{_b(m.ballot)}={m.value.decode(errors='replace')}"
    if isinstance(m, Promise):
        acc = m.accepted
        return (f"Promise{_b(m.ballot)}[{m.acceptor.hex()[:4]}]"
                + (f"(had {_b(acc.ballot)}={acc.value.decode(errors='replace')})"
                   if isinstance(acc, AcceptedValue) else ""))
    if isinstance(m, Accepted):
        return f"Accepted{_b(m.ballot)}[{m.acceptor.hex()[:4]}]#{m.value_hash.hex()[:6]}"
    if isinstance(m, Nack):
        return f"Nack{_b(m.ballot)}(promised {_b(m.promised)})"
    return type(m).__name__


def _b(ballot: object) -> str:
    return f"({getattr(ballot, 'round', '?')},{getattr(ballot, 'proposer', b'').hex()[:4]})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Exhaustively explore the Paxos core's states.")
    ap.add_argument("--proposers", type=int, default=2)
    ap.add_argument("--acceptors", default="correct,correct,correct",
                    help="comma-separated kinds: correct, forgetful, yes-man")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-crashes", action="store_true")
    ap.add_argument("--max-states", type=int)
    ap.add_argument("--max-seconds", type=float)
    ap.add_argument("--expect-forks", action="store_true",
                    help="allow two chosen values if the learner detects them (Byzantine runs)")
    ap.add_argument("--require-complete", action="store_true",
                    help="fail (exit 1) unless the whole state space was explored (nightly)")
    args = ap.parse_args(argv)
    cfg = Config(args.proposers, tuple(args.acceptors.split(",")), args.rounds,
                 not args.no_crashes, args.max_states, args.max_seconds, args.expect_forks)
    result = Explorer(cfg).run(progress=lambda r: print(f"  ... {r.states:,} states, "
                                                         f"{r.seconds:.0f} s", flush=True))
    print(result.summary())
    if result.first_fork_trace:
        print("first detected fork:")
        for i, step in enumerate(result.first_fork_trace):
            print(f"  {i:3d}. {step}")
    return report(result.violations, result.complete, args.require_complete)


def report(violations: list[Violation], complete: bool, require_complete: bool) -> int:
    """Print each violation with its trace; the exit code of an exploration (1 for a
    violation, or for an incomplete one when ``require_complete``). Both explorers use it."""
    for v in violations:
        print(f"VIOLATION {v.invariant}: {v.detail}")
        for i, step in enumerate(v.trace):
            print(f"  {i:3d}. {step}")
    if require_complete and not complete:
        print("INCOMPLETE: the exploration stopped before covering the whole state space")
        return 1
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
