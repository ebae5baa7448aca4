"""Exhaustive state-space exploration of the Paxos fast path (leases), over two slots.

:mod:`simulations.paxos_explorer` checks one slot of the full protocol; this checks what the
fast path adds, with the production cores and real Ed25519 signatures:

* the **leader** proposes slot 0 with ``want_lease`` (phase 2 sends AcceptLeased, each acceptor
  may answer with a signed promise of the same ballot for slot 1);
* once a quorum of its slot-0 votes is in the network, the leader may learn the decision from
  them and **take the fast path**: a slot-1 proposer built with the lease those votes carried,
  which sends Accept at once (and runs the full protocol on any retry);
* ``rivals`` other proposers run the full protocol for slot 1 from the start, so they can
  prepare slot 1 before, during or after the lease is granted and used.

As in the one-slot explorer, every interleaving of deliveries (any message, any time, any
number of times: loss, duplication, reordering), proposer timeouts (up to ``max_rounds``) and
acceptor crash-restarts (memory replaced by what was persisted) is enumerated, and every state
is checked for agreement and validity **per slot**, certificates, proposer outcomes, no vote
below a promise, and (``check_promises``) that no acceptor ever lowers a promise.

Acceptor kinds: ``correct``; ``yes-man`` (Byzantine: signs anything, grants every lease);
``lease-lowers-promise``, a planted bug: it grants a lease even after promising a higher
ballot for the next slot to someone else, overwriting that promise; ``lease-forgets``, another:
it signs the lease but keeps no record of it. The explorer must find both. (On a syncnode the
first cannot happen: it refuses requests for slot n + 1 until it holds slot n's decision, and
after that answers slot n with the decision, so its lease always comes first; the second is
what ``--break lease-forgets`` plants in the simulator sweep.)
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from proto.identity import SecretKey, fingerprint
from proto.paxos.acceptor import SlotState
from proto.paxos.learner import Decision, Learner
from proto.paxos.messages import (
    Accept,
    Accepted,
    AcceptedLeased,
    AcceptLeased,
    Ballot,
    EquivocationProof,
    Nack,
    Prepare,
    Promise,
    value_hash,
)
from proto.paxos.proposer import Lost, Phase, Proposer
from proto.paxos.quorum import AcceptorSet, CertificateError, verify_certificate
from simulations.lease_model import (
    KINDS,
    LeaseConfig,
    LeaseResult,
    _below,
    _rename,
    _say,
    _vote,
)
from simulations.paxos_explorer import (
    Violation,
    _replace,
    _trace,
    memoised_signatures,
    report,
)

__all__ = ["KINDS", "LeaseConfig", "LeaseExplorer", "LeaseResult", "main"]

GROUP = b"explored-group"
SLOTS = 2
LEADER, LEADER_NEXT = 0, 1  # proposer indices: the leader at slot 0, then at slot 1


Part = tuple[tuple[SlotState, ...], tuple[SlotState, ...]]  # (memory, persisted) per slot


@dataclass
class _Node:
    acceptors: tuple[Part, ...]
    proposers: tuple[Proposer | None, ...]
    net: frozenset[int]


class LeaseExplorer:
    def __init__(self, config: LeaseConfig) -> None:
        self.config = config
        self.keys = [SecretKey(bytes([0xA0 + i]) * 32) for i in range(len(config.acceptors))]
        self.aset = AcceptorSet(frozenset(k.public for k in self.keys))
        self.acc_index = {k.public: i for i, k in enumerate(self.keys)}
        self.pkeys = [SecretKey(bytes([0x10 + i]) * 32) for i in range(1 + config.rivals)]
        self.members = {fingerprint(k.public): k.public for k in self.pkeys}
        self.by_fpr = {fingerprint(k.public): i for i, k in enumerate(self.pkeys)}
        self.values = [b"lead-0", b"lead-1"] + [f"rival-{i}".encode()
                                                for i in range(config.rivals)]
        self.valid = [{value_hash(b"lead-0")},
                      {value_hash(v) for v in self.values[1:]}]
        self.hash_index = {value_hash(v): i for i, v in enumerate(self.values)}
        self.msgs: list[object] = []
        self._ids: dict[object, int] = {}
        self._abs: list[tuple[object, ...]] = []
        self._acc_cache: dict[tuple[object, ...], tuple[object, ...]] = {}
        self._prop_cache: dict[tuple[object, ...], tuple[Proposer, tuple[int, ...]]] = {}
        self._cert_cache: dict[frozenset[int], tuple[set[int], str | None]] = {}
        self.pure = all(k == "correct" for k in config.acceptors)
        kinds = config.acceptors  # renamings of interchangeable acceptors (symmetry reduction)
        self.perms = [perm for perm in itertools.permutations(range(len(kinds)))
                      if all(kinds[perm[i]] == kinds[i] for i in range(len(kinds)))]
        self._out_cache: dict[tuple[object, ...], str | None] = {}

    # -- messages and state keys ---------------------------------------------------------------

    def _intern(self, m: object) -> int:
        i = self._ids.get(m)
        if i is None:
            i = self._ids[m] = len(self.msgs)
            self.msgs.append(m)
            self._abs.append(self._abs_msg(m))
        return i

    def _ab(self, b: Ballot | None) -> tuple[int, int]:
        return (-1, -1) if b is None else (b.round, self.by_fpr[b.proposer])

    def _av(self, v: bytes | None) -> int:
        return -1 if v is None else self.hash_index[value_hash(v)]

    def _ast(self, st: SlotState) -> tuple[object, ...]:
        acc = st.accepted
        return (self._ab(st.promised), () if acc is None else (self._ab(acc.ballot),
                                                                self._av(acc.value)))

    def _abs_msg(self, m: object) -> tuple[object, ...]:
        if isinstance(m, Prepare):
            return (0, m.slot, self._ab(m.ballot))
        if isinstance(m, Accept | AcceptLeased):
            a = m.accept if isinstance(m, AcceptLeased) else m
            return (1, a.slot, self._ab(a.ballot), self._av(a.value), isinstance(m, AcceptLeased))
        if isinstance(m, Promise):
            acc = m.accepted
            return (2, m.slot, self._ab(m.ballot), self.acc_index[m.acceptor],
                    () if acc is None else (self._ab(acc.ballot), self._av(acc.value)))
        if isinstance(m, Accepted | AcceptedLeased):
            v = m.accepted if isinstance(m, AcceptedLeased) else m
            lease = isinstance(m, AcceptedLeased) and m.lease is not None
            return (3, v.slot, self._ab(v.ballot), self.acc_index[v.acceptor],
                    self.hash_index.get(v.value_hash, -1), isinstance(m, AcceptedLeased), lease)
        return (4, self._ab(getattr(m, "ballot", None)))

    def key(self, node: _Node) -> tuple[object, ...]:
        """Abstract state: votes whose ballot can gain no more votes only count as "chosen"."""
        accs = tuple((tuple(map(self._ast, mem)), tuple(map(self._ast, pst)))
                     for mem, pst in node.acceptors)
        props = tuple(() if p is None else (p.slot, p.round, p._next_round, p.phase.value,
                                              self._av(p.proposal), p._lease is not None)
                      for p in node.proposers)
        open_ = {(self.msgs[m].slot, self.msgs[m].ballot) for m in node.net  # type: ignore[attr-defined]
                 if isinstance(self.msgs[m], Accept | AcceptLeased)}
        live, frozen = [], {}
        for m in node.net:
            msg = self.msgs[m]
            if isinstance(msg, Accepted | AcceptedLeased) and not self._fast_input(node, msg) \
                    and (msg.slot, msg.ballot) not in open_:
                k = self._abs[m][1:3] + self._abs[m][4:5]
                frozen[k] = frozen.get(k, 0) + 1
            else:
                live.append(self._abs[m])
        chosen = tuple(sorted(k for k, n in frozen.items() if n >= self.aset.quorum))
        keys = []
        for perm in self.perms:
            renamed: list[object] = [None] * len(accs)
            for i, a in enumerate(accs):
                renamed[perm[i]] = a
            net = tuple(sorted(_rename(m, perm) for m in live))
            keys.append((tuple(renamed), props, net, chosen))
        return min(keys)  # type: ignore[type-var]

    def _fast_input(self, node: _Node, msg: object) -> bool:
        lead = node.proposers[LEADER]
        return (node.proposers[LEADER_NEXT] is None and lead is not None
                and isinstance(msg, AcceptedLeased) and lead.phase is Phase.ACCEPTING
                and msg.ballot == lead.ballot)

    # -- the real cores ------------------------------------------------------------------------

    def _acceptors_for(self, group: bytes, slot: int) -> AcceptorSet | None:
        return self.aset if group == GROUP and 0 <= slot < SLOTS else None

    def _acceptor_step(self, a: int, mem: tuple[SlotState, ...], m: int) -> tuple[object, ...]:
        """(new memory, persisted updates {slot: state}, reply id, violation) (cached)."""
        hit = self._acc_cache.get((a, mem, m))
        if hit is not None:
            return hit
        kind = self.config.acceptors[a]
        acc = KINDS[kind](self.keys[a], self._acceptors_for, lambda g, s, f: self.members.get(f),
                          {(GROUP, s): mem[s] for s in range(SLOTS)})
        msg = self.msgs[m]
        assert isinstance(msg, Prepare | Accept | AcceptLeased)
        step = acc.handle(msg)
        new = tuple(acc.state(GROUP, s) for s in range(SLOTS))
        persisted = {r.slot: SlotState(r.promised, r.accepted) for r in step.persist
                     if r.slot < SLOTS}
        vote = step.reply.accepted if isinstance(step.reply, AcceptedLeased) else step.reply
        problem = None
        if kind != "yes-man":
            if isinstance(vote, Accepted) and _below(vote.ballot, mem[vote.slot].promised):
                problem = ("no-accept-below-promise",
                           f"A{a} voted {vote.ballot} after promising {mem[vote.slot].promised}")
            for s in range(SLOTS):
                if self.config.check_promises and _below(new[s].promised, mem[s].promised):
                    problem = ("promise-monotonic", f"A{a} lowered its promise for slot {s} "
                               f"from {mem[s].promised} to {new[s].promised}")
        result = (new, persisted, self._intern(step.reply), problem)
        self._acc_cache[(a, mem, m)] = result
        return result

    def _proposer_step(self, i: int, p: Proposer, action: str, inputs: tuple[int, ...]
                       ) -> tuple[Proposer, tuple[int, ...]]:
        key = (i, p.snapshot(), action, inputs)
        hit = self._prop_cache.get(key)
        if hit is None:
            q = p.clone()
            out: list[object] = list(q.retry()) if action == "retry" else []
            for m in inputs:
                out.extend(q.receive(self.msgs[m]))  # type: ignore[arg-type]
            hit = self._prop_cache[key] = (q, tuple(self._intern(x) for x in out))
        return hit

    # -- the state graph -----------------------------------------------------------------------

    def initial(self) -> _Node:
        lead = Proposer(self.pkeys[0], GROUP, 0, self.values[0], self.aset, want_lease=True)
        props: list[Proposer | None] = [lead, None]
        net = {self._intern(m) for m in lead.start()}
        for r in range(self.config.rivals):
            p = Proposer(self.pkeys[1 + r], GROUP, 1, self.values[2 + r], self.aset)
            net.update(self._intern(m) for m in p.start())
            props.append(p)
        empty = (SlotState(),) * SLOTS
        return _Node(tuple((empty, empty) for _ in self.keys), tuple(props), frozenset(net))

    def successors(self, node: _Node) -> Iterator[tuple[str, _Node, Violation | None]]:
        for i, p in enumerate(node.proposers):
            bound = self.config.leader_rounds if i == LEADER else self.config.max_rounds
            if p is not None and p.phase is not Phase.DONE and p.round < bound:
                q, out = self._proposer_step(i, p, "retry", ())
                yield (f"P{i} times out -> round {q.round}",
                       self._node(node.acceptors, _replace(node.proposers, i, q),
                                  node.net.union(out)), None)
        if self.config.crashes:
            for a, (mem, pst) in enumerate(node.acceptors):
                if mem != pst:
                    yield (f"A{a} crashes and restarts",
                           _Node(_replace(node.acceptors, a, (pst, pst)), node.proposers,
                                 node.net), None)
        for m in sorted(node.net):
            msg = self.msgs[m]
            if not isinstance(msg, Prepare | Accept | AcceptLeased):
                continue
            for a, (mem, pst) in enumerate(node.acceptors):
                new, persisted, reply, problem = self._acceptor_step(a, mem, m)
                pst = tuple(persisted.get(s, pst[s]) for s in range(SLOTS))  # type: ignore[attr-defined]
                child = self._node(_replace(node.acceptors, a, (new, pst)), node.proposers,
                                   node.net | {reply})  # type: ignore[operator]
                if child.acceptors == node.acceptors and child.net == node.net:
                    continue
                yield (f"A{a} <- {_say(msg)} -> {_say(self.msgs[reply])}",  # type: ignore[index]
                       child, Violation(*problem, []) if problem else None)  # type: ignore[misc]
        for i, p in enumerate(node.proposers):
            if p is None or p.phase is not Phase.PREPARING:
                continue
            promises = sorted(m for m in node.net if isinstance(self.msgs[m], Promise)
                              and self._abs[m][1:3] == (p.slot, self._ab(p.ballot)))
            for quorum in itertools.combinations(promises, self.aset.quorum):
                q, out = self._proposer_step(i, p, "receive", quorum)
                if out:
                    yield (f"P{i} <- quorum of promises -> {_say(self.msgs[out[0]])}",
                           self._node(node.acceptors, _replace(node.proposers, i, q),
                                      node.net.union(out)), None)
        yield from self._fast_paths(node)

    def _fast_paths(self, node: _Node) -> Iterator[tuple[str, _Node, Violation | None]]:
        """The leader learns slot 0 from a quorum of its votes and starts slot 1 with the
        lease they carried (the driver's path: decision, then the lease for the next slot)."""
        votes = sorted(m for m in node.net if self._fast_input(node, self.msgs[m]))
        lead = node.proposers[LEADER]
        for quorum in itertools.combinations(votes, self.aset.quorum):
            assert lead is not None
            learned, _ = self._proposer_step(LEADER, lead, "receive", quorum)
            lease = learned.next_lease()
            if learned.outcome is None or lease is None:
                continue
            nxt = Proposer(self.pkeys[0], GROUP, 1, self.values[1], self.aset, lease=lease)
            out = tuple(self._intern(x) for x in nxt.start())
            granted = sum(self.msgs[m].lease is not None for m in quorum)  # type: ignore[attr-defined]
            props = _replace(_replace(node.proposers, LEADER, learned), LEADER_NEXT, nxt)
            yield (f"P0 decides slot 0 with {granted} lease promise(s), slot 1 -> "
                   f"{_say(self.msgs[out[0]])}", self._node(node.acceptors, props,
                                                            node.net.union(out)), None)

    def _node(self, acceptors: tuple[Part, ...], proposers: tuple[Proposer | None, ...],
              net: frozenset[int]) -> _Node:
        """Drop messages that can cause nothing more: Promises of a ballot no proposer is
        preparing, Nacks (a timeout covers them), and, when every acceptor is correct (they
        never lower a promise), requests below every promise of their slot."""
        live = {(p.slot, p.ballot) for p in proposers if p and p.phase is Phase.PREPARING}
        floors: list[Ballot | None] = []
        for s in range(SLOTS):
            bs = [b for mem, pst in acceptors for b in (mem[s].promised, pst[s].promised)]
            floors.append(None if not self.pure or None in bs else min(bs))  # type: ignore[type-var]

        def alive(m: int) -> bool:
            msg = self.msgs[m]
            if isinstance(msg, Promise):
                return (msg.slot, msg.ballot) in live
            if isinstance(msg, Prepare | Accept | AcceptLeased):
                floor = floors[msg.slot]
                return floor is None or not msg.ballot < floor
            return not isinstance(msg, Nack)

        return _Node(acceptors, proposers, frozenset(m for m in net if alive(m)))

    # -- invariants ----------------------------------------------------------------------------

    def check(self, node: _Node) -> tuple[Violation | None, list[set[bytes]]]:
        votes = frozenset(m for m in node.net
                          if isinstance(self.msgs[m], Accepted | AcceptedLeased))
        tally: dict[tuple[int, object, bytes], set[bytes]] = {}
        for m in votes:
            v = _vote(self.msgs[m])
            tally.setdefault((v.slot, v.ballot, v.value_hash), set()).add(v.acceptor)
        chosen: list[set[bytes]] = [set() for _ in range(SLOTS)]
        for (s, _, h), accs in tally.items():
            if len(accs) >= self.aset.quorum:
                chosen[s].add(h)
        proofs, problem = self._learn_all(votes)
        if problem:
            return Violation("certificates", problem, []), chosen
        for s in range(SLOTS):
            if len(chosen[s]) > 1 and not (self.config.expect_forks and s in proofs):
                return Violation("agreement", f"slot {s}: {len(chosen[s])} values chosen "
                                 f"(equivocation proof raised: {s in proofs})", []), chosen
            if chosen[s] - self.valid[s]:
                return Violation("validity", f"slot {s}: a value not proposed there", []), chosen
        for i, p in enumerate(node.proposers):
            if p is not None and (bad := self._outcome(i, p, votes, chosen[p.slot])):
                return Violation("proposer-outcome", bad, []), chosen
        return None, chosen

    def _outcome(self, i: int, p: Proposer, votes: frozenset[int], chosen: set[bytes]
                 ) -> str | None:
        key = (i, p.snapshot(), votes, frozenset(chosen))
        if key not in self._out_cache:
            self._out_cache[key] = self._outcome_of(i, p, votes, chosen)
        return self._out_cache[key]

    def _outcome_of(self, i: int, p: Proposer, votes: frozenset[int], chosen: set[bytes]
                    ) -> str | None:
        """Every vote so far delivered to (a copy of) the proposer: what it reports must be
        what is chosen, and Decided exactly when that is its own value."""
        q = p.clone()
        for m in sorted(votes):
            if _vote(self.msgs[m]).slot != p.slot:
                continue
            q.receive(self.msgs[m])  # type: ignore[arg-type]
            out = q.outcome
            if out is None or isinstance(out, EquivocationProof):
                continue
            mine = out.certificate.value_hash == value_hash(p.own_value)
            if out.certificate.value_hash not in chosen:
                return f"P{i} reports {type(out).__name__} for a value not chosen"
            if isinstance(out, Lost) == mine:
                return f"P{i} reports {type(out).__name__} wrongly"
            return None
        return None

    def _learn_all(self, votes: frozenset[int]) -> tuple[set[int], str | None]:
        hit = self._cert_cache.get(votes)
        if hit is None:
            learner, problem = Learner(self._acceptors_for), None
            for m in sorted(votes):
                event = learner.on_accepted(_vote(self.msgs[m]))
                certs = ([event.certificate] if isinstance(event, Decision) else
                         [event.first, event.second] if event is not None else [])
                for cert in certs:
                    try:
                        verify_certificate(cert, self.aset)
                    except CertificateError as exc:
                        problem = f"learner formed a bad certificate: {exc}"
            hit = self._cert_cache[votes] = ({p.first.slot for p in learner.proofs}, problem)
        return hit

    def run(self, *, stop_at_first: bool = True) -> LeaseResult:
        cfg, result = self.config, LeaseResult(self.config)
        start = time.perf_counter()
        with memoised_signatures():
            root = self.initial()
            parents: dict[object, tuple[object, str]] = {self.key(root): (None, "start")}
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
                    violation, chosen = self.check(child)
                    violation = step_violation or violation
                    nxt = child.proposers[LEADER_NEXT]
                    if nxt is not None:
                        result.fast_paths += 1
                        lead = child.proposers[LEADER]
                        assert lead is not None
                        result.fast_decisions += self._chosen_at(child, lead.ballot)
                    result.decided_both += all(chosen)
                    result.detected_forks += any(len(c) > 1 for c in chosen) and not violation
                    if violation is not None:
                        violation.trace = _trace(parents, key)  # type: ignore[arg-type]
                        result.violations.append(violation)
                        if stop_at_first:
                            result.seconds = time.perf_counter() - start
                            return result
                    queue.append(child)
                    if cfg.max_states is not None and result.states >= cfg.max_states:
                        result.complete = False
                        queue.clear()
                        break
        result.seconds = time.perf_counter() - start
        return result

    def _chosen_at(self, node: _Node, ballot: Ballot) -> bool:
        voters = {_vote(self.msgs[m]).acceptor for m in node.net
                  if isinstance(self.msgs[m], Accepted | AcceptedLeased)
                  and _vote(self.msgs[m]).slot == 1 and _vote(self.msgs[m]).ballot == ballot}
        return len(voters) >= self.aset.quorum


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Exhaustively explore the Paxos fast path.")
    ap.add_argument("--acceptors", default="correct,correct,correct",
                    help=f"comma-separated kinds: {', '.join(KINDS)}")
    ap.add_argument("--rivals", type=int, default=1)
    ap.add_argument("--leader-rounds", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the slot-1 proposers")
    ap.add_argument("--no-promise-check", action="store_true")
    ap.add_argument("--expect-forks", action="store_true")
    ap.add_argument("--max-states", type=int)
    ap.add_argument("--require-complete", action="store_true")
    a = ap.parse_args(argv)
    r = LeaseExplorer(LeaseConfig(a.rivals, tuple(a.acceptors.split(",")), a.rounds,
                                  a.leader_rounds, True, not a.no_promise_check,
                                  a.expect_forks, a.max_states)).run()
    print(r.summary())
    return report(r.violations, r.complete, a.require_complete)


if __name__ == "__main__":
    raise SystemExit(main())
