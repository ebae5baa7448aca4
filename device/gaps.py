"""Gaps in causal delivery: updates a pending payload needs that this device does not hold,
and when that is proof they were lost on the syncnodes, so the members are asked for the
document's state (:meth:`device.inbox.Inbox.check_gap`). Pure rules, no I/O."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from proto.payload import Payload


def _needed(pending: Iterable[Payload]) -> tuple[dict[bytes, int], dict[bytes, set[int]]]:
    """Per sender, the highest seq a pending payload needs (its own sender's predecessors, and
    its dependencies), and the seqs pending."""
    need: dict[bytes, int] = {}
    held: dict[bytes, set[int]] = {}
    for p in pending:
        held.setdefault(p.sender, set()).add(p.seq)
        need[p.sender] = max(need.get(p.sender, 0), p.seq - 1)
        for d in p.deps:
            if d.sender != p.sender:
                need[d.sender] = max(need.get(d.sender, 0), d.seq)
    return need, held


def waiting_for(pending: Iterable[Payload], delivered: Mapping[bytes, int]) -> int:
    """How many updates of others causal delivery waits for that this device does not hold:
    for each sender, the seqs up to the highest one a pending payload needs that are neither
    delivered nor pending. Counted, not listed, so a made-up dependency on seq 2**60 costs
    nothing."""
    need, held = _needed(pending)
    missing = 0
    for sender, upto in need.items():
        low = delivered.get(sender, 0)
        if upto > low:
            missing += upto - low - sum(low < q <= upto for q in held.get(sender, ()))
    return missing


def first_missing(pending: Iterable[Payload], delivered: Mapping[bytes, int]) -> dict[bytes, int]:
    """Per sender that causal delivery waits for, the first seq this device does not hold
    (:func:`waiting_for` counts them)."""
    need, held = _needed(pending)
    out = {}
    for sender, upto in need.items():
        q, have = delivered.get(sender, 0) + 1, held.get(sender, set())
        while q <= upto and q in have:
            q += 1
        if q <= upto:
            out[sender] = q
    return out


def backfill_shows_gap(gaps: Mapping[bytes, int], served: Mapping[bytes, int]) -> bool:
    """Whether a backfill that began before the gap was found still shows that its syncnode
    lacks the missing updates: for each sender, it served a later seq than the first missing
    one (it skipped it). One that stopped below it may simply have read before the update
    arrived there (an update pushed ahead of its predecessor, both in flight)."""
    return all(served.get(sender, 0) > seq for sender, seq in gaps.items())


def gap_state_due(*, missing: int, since: float | None, now: float,
                  backfilled: Collection[bytes], syncnodes: Collection[bytes], wait: float,
                  asked: int, last_ask: float, retry: float, retry_max: float) -> bool:
    """Ask the members for the document's state because of a gap: updates that causal delivery
    waits for (``missing``, since ``since``) came from no syncnode, although every syncnode of
    the document was backfilled from since they were found missing, or ``wait`` seconds went
    by (a syncnode is down). A gap nobody answered for is asked about again after ``retry``
    seconds, doubling with each request (``asked`` so far, the last at ``last_ask``) up to
    ``retry_max``: each request is an envelope, and the member that holds the updates may be
    offline for days."""
    if missing <= 0 or since is None:
        return False
    if not (set(syncnodes) <= set(backfilled) or now - since >= wait):
        return False
    return asked == 0 or now - last_ask >= min(retry_max, retry * 2 ** min(asked - 1, 40))
