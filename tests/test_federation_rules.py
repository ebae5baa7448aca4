"""The rules of changing a document's syncnodes (:mod:`device.rules`, used by
:mod:`device.federation`), on their own."""

from __future__ import annotations

import pytest

from device.rules import named_since, removal_safe, syncnodes_with, syncnodes_without
from proto.manifest import Manifest, SyncnodeEntry
from proto.paxos.messages import MAX_ACCEPTORS

A, B, C, D = (SyncnodeEntry(bytes([i]) * 32, ()) for i in range(1, 5))


def manifest(epoch: int, *nodes: SyncnodeEntry) -> Manifest:
    return Manifest(b"g" * 16, epoch, (), tuple(nodes), "loro", None, None, None)


def test_named_since_is_the_start_of_the_current_run() -> None:
    log = [manifest(0, A, B, C), manifest(1, A, B, C, D), manifest(2, B, C, D),
           manifest(3, B, C, D)]
    assert named_since(log, D.node_id) == 1
    assert named_since(log, B.node_id) == 0
    assert named_since(log, A.node_id) is None  # removed at slot 2
    # removed and added again: the adoption starts at the re-add, not at the first add
    log += [manifest(4, B, C), manifest(5, B, C, D)]
    assert named_since(log, D.node_id) == 5


def test_add_refuses_a_member_and_a_full_set() -> None:
    assert syncnodes_with((A, B), C) == (A, B, C)
    with pytest.raises(ValueError, match="already serves"):
        syncnodes_with((A, B), B)
    full = tuple(SyncnodeEntry(bytes([i]) * 32, ()) for i in range(10, 10 + MAX_ACCEPTORS))
    with pytest.raises(ValueError, match="at most"):
        syncnodes_with(full, A)


def test_remove_refuses_a_stranger_and_the_last_syncnode() -> None:
    assert syncnodes_without((A, B, C), B.node_id) == (A, C)
    with pytest.raises(ValueError, match="does not serve"):
        syncnodes_without((A, B), C.node_id)
    with pytest.raises(ValueError, match="at least one"):
        syncnodes_without((A,), A.node_id)


def test_removal_waits_until_every_remaining_syncnode_holds_the_history() -> None:
    rest = [B.node_id, C.node_id, D.node_id]
    assert removal_safe({B.node_id: True, C.node_id: True, D.node_id: True}, rest)
    # D (just added) is still pulling: the removed one may hold updates D lacks
    assert not removal_safe({B.node_id: True, C.node_id: True, D.node_id: False}, rest)
    # D did not answer: it may be the one still pulling
    assert not removal_safe({B.node_id: True, C.node_id: True}, rest)
