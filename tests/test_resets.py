"""Evidence that a syncnode lost its storage (:mod:`proto.resets`): two statements of one node
under two incarnations prove a reset, checked with nothing else; one incarnation, two nodes,
or a statement changed after signing prove nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from proto.codec import decode_as, encode
from proto.holdings import SignedAck, SignedHeads, Statement
from proto.resets import ResetError, StorageReset, reset_between, reset_detail, verify_reset
from tests.test_holdings import INC, INC2, NODE, OTHER, S, ack, backfill, heads
from tests.test_withholding import syncdevice


def roundtrip(evidence: StorageReset) -> StorageReset:
    return decode_as(encode(evidence), StorageReset)


@pytest.mark.parametrize(("old", "new"), [
    (ack(), ack(seq=6, inc=INC2)),
    (ack(), heads({S: 0}, inc=INC2)),
    (heads({S: 9}), backfill({}, inc=INC2)),
    (ack(at=900), heads({S: 0}, at=10, inc=INC2)),  # the new clock is behind: still a reset
])
def test_two_incarnations_prove_a_reset(old: SignedAck | SignedHeads, new: Statement) -> None:
    evidence = reset_between(old, new)
    assert evidence is not None
    shown = verify_reset(roundtrip(evidence))
    assert (shown.node_id, shown.old_incarnation, shown.new_incarnation) == (
        NODE.public, INC, INC2)
    assert NODE.public.hex() in shown.describe()


@pytest.mark.parametrize(("old", "new"), [
    (ack(), heads({S: 0})),  # one incarnation: withholding, if anything (proto.holdings)
    (ack(), heads({S: 0}, key=OTHER, inc=INC2)),  # another node's
])
def test_one_incarnation_or_two_nodes_is_no_reset(old: SignedAck | SignedHeads,
                                                   new: Statement) -> None:
    assert reset_between(old, new) is None


GOOD = StorageReset(old_ack=ack(), new_heads=heads({S: 0}, inc=INC2))


@pytest.mark.parametrize(("evidence", "why"), [
    (dataclasses.replace(GOOD, old_ack=None), "exactly one"),
    (dataclasses.replace(GOOD, new_ack=ack(inc=INC2)), "exactly one"),
    (dataclasses.replace(GOOD, old_heads=heads({S: 1})), "exactly one"),
    (dataclasses.replace(GOOD, new_heads=heads({S: 0}, key=OTHER, inc=INC2)),
     "different syncnodes"),
    (dataclasses.replace(GOOD, new_heads=heads({S: 0})), "same incarnation"),
    # an incarnation changed after signing: the signature no longer holds
    (dataclasses.replace(GOOD, new_heads=dataclasses.replace(heads({S: 0}), incarnation=INC2)),
     "signature"),
    (dataclasses.replace(GOOD, old_ack=dataclasses.replace(ack(inc=INC2), incarnation=INC)),
     "signature"),
])
def test_forged_or_tampered_reset_evidence_is_refused(evidence: StorageReset, why: str) -> None:
    verify_reset(GOOD)
    with pytest.raises(ResetError, match=why):
        verify_reset(roundtrip(evidence))


def test_each_change_of_incarnation_is_its_own_alarm() -> None:
    """Alarms are kept once per kind and detail: a node that resets twice shows twice."""
    first = reset_detail(NODE.public, INC, INC2)
    assert NODE.public.hex() in first and "lost its storage" in first
    assert first != reset_detail(NODE.public, INC2, b"k" * 16)


def test_verify_evidence_checks_a_reset_on_its_own(tmp_path: Path) -> None:
    """``syncdevice verify-evidence`` on an exported syncnode-reset evidence file: verified
    and said to be a reset, not withholding; refused (exit 5) once tampered with."""
    raw = encode(GOOD)
    good = tmp_path / "reset.proof"
    good.write_bytes(raw)
    ok = syncdevice(tmp_path / "home", "--json", "verify-evidence", str(good))
    assert ok.returncode == 0, ok.stderr.decode()
    shown = json.loads(ok.stdout)
    assert shown["verified"] and shown["reset"] and shown["node_id"] == NODE.public.hex()
    assert (shown["old_incarnation"], shown["new_incarnation"]) == (INC.hex(), INC2.hex())
    text = syncdevice(tmp_path / "home", "verify-evidence", str(good)).stdout.decode()
    assert text.startswith("VERIFIED (a reset, not withholding)")
    tampered = bytearray(raw)
    tampered[-3] ^= 0x01  # inside the new statement's signature
    bad = tmp_path / "tampered.proof"
    bad.write_bytes(bytes(tampered))
    refused = syncdevice(tmp_path / "home", "verify-evidence", str(bad))
    assert refused.returncode == 5 and refused.stdout.decode().startswith("DOES NOT VERIFY")
