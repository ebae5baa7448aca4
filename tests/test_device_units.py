"""Sans-IO and local pieces of the device agent: causal delivery, payloads, the Loro boundary,
invite tickets, and the device store's crash rule."""

from __future__ import annotations

import base64
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.crdt_loro import LoroDocument
from device.rules import rotation_jitter, rotation_wait
from proto.causal import CausalBuffer
from proto.codec.wire import encode_struct
from proto.crdt import CrdtError
from proto.errors import DecodeError
from proto.identity import SecretKey
from proto.invite import PREFIX as INVITE_PREFIX
from proto.invite import InviteTicket, JoinRequest
from proto.manifest import Role, SyncnodeEntry
from proto.payload import Dep, Payload, PayloadKind, pack_updates, unpack_updates

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


def upd(sender: bytes, seq: int, **deps: int) -> Payload:
    names = {"a": A, "b": B, "c": C}
    return Payload(PayloadKind.UPDATE, sender, seq,
                   tuple(Dep(names[k], v) for k, v in sorted(deps.items())), "loro/1", b"")


def history() -> list[Payload]:
    """A causal history over three senders: each depends on what it had seen."""
    return [upd(A, 1), upd(B, 1, a=1), upd(A, 2, b=1), upd(C, 1, a=2, b=1), upd(B, 2, a=2),
            upd(C, 2, b=2), upd(A, 3, c=2, b=2)]


@settings(max_examples=300, deadline=None)
@given(st.permutations(history() * 2))
def test_any_order_with_duplicates_delivers_each_once_in_causal_order(
        order: list[Payload]) -> None:
    buf = CausalBuffer()
    out: list[Payload] = []
    for p in order:
        out += buf.add(p)
    assert sorted((p.sender, p.seq) for p in out) == sorted((p.sender, p.seq) for p in history())
    position = {(p.sender, p.seq): i for i, p in enumerate(out)}
    for p in out:
        if p.seq > 1:
            assert position[(p.sender, p.seq - 1)] < position[(p.sender, p.seq)]
        for d in p.deps:
            assert position[(d.sender, d.seq)] < position[(p.sender, p.seq)]
    assert not buf.pending and buf.watermarks() == {A: 3, B: 2, C: 2}


def test_state_covers_a_vector_and_drops_covered_pending() -> None:
    buf = CausalBuffer()
    assert buf.add(upd(B, 3, a=5)) == []  # waits for b1..2 and a1..5
    assert buf.watermarks() == {}
    state = Payload(PayloadKind.STATE, C, 4, (Dep(A, 5), Dep(B, 3), Dep(C, 3)), "loro/1", b"")
    assert buf.add(state) == [state]
    assert buf.delivered == {A: 5, B: 3, C: 4} and not buf.pending
    assert buf.add(upd(B, 3, a=5)) == []  # covered: a duplicate now
    bad = Payload(PayloadKind.STATE, A, 9, (Dep(A, 2),), "loro/1", b"")
    with pytest.raises(DecodeError):
        buf.add(bad)  # a STATE must cover its own sender's earlier payloads


def test_pack_updates_round_trip_and_bounds() -> None:
    assert unpack_updates(pack_updates([b"x", b"yz"])) == (b"x", b"yz")
    with pytest.raises(DecodeError):
        unpack_updates(b"not zlib")
    bomb = zlib.compress(b"\0" * (8 * 1024 * 1024))
    with pytest.raises(DecodeError):
        unpack_updates(bomb)


def test_loro_rejects_corrupt_updates_and_keeps_the_good_ones() -> None:
    a, b = LoroDocument(1), LoroDocument(2)
    good = a.change(lambda e: e.text("t").insert(0, "hello"))
    assert good is not None
    corrupt = good[:-4] + bytes(4)
    result = b.apply([corrupt, good, b"\xff" * 10])
    assert result[1] is None
    assert isinstance(result[0], CrdtError) and isinstance(result[2], CrdtError)
    assert b.value() == {"t": "hello"}
    before = b.snapshot()
    assert isinstance(b.apply([corrupt])[0], CrdtError)
    assert b.snapshot() == before  # untouched
    with pytest.raises(CrdtError):
        b.diff_since(b"\x07garbage")
    with pytest.raises(CrdtError):
        LoroDocument(3, snapshot=b"junk")


def test_loro_diff_since_and_idempotence() -> None:
    a, b = LoroDocument(1), LoroDocument(2)
    a.change(lambda e: e.counter("c").increment(2))
    v = b.version()
    u = a.change(lambda e: e.list("l").push("x"))
    assert u is not None
    b.apply([a.diff_since(v)])
    b.apply([a.diff_since(v), u])  # again: no double counting
    assert b.value() == a.value() == {"c": 2.0, "l": ["x"]}
    assert a.change(lambda e: None) is None


def test_invite_ticket_round_trip_and_errors() -> None:
    t = InviteTicket(b"g" * 32, b"h" * 32, b"k" * 32, b"e" * 32, ("127.0.0.1:2",),
                     (SyncnodeEntry(b"n" * 32, ("127.0.0.1:1",)),), b"s" * 16, 123)
    assert InviteTicket.parse(str(t)) == t
    assert InviteTicket.parse(str(t)[:20] + "\n " + str(t)[20:]) == t  # pasted with breaks
    for bad in ["", "sn1abc", "sninv1!!!", "sninv1" + "a" * 5000, str(t)[:-6]]:
        with pytest.raises(DecodeError):
            InviteTicket.parse(bad)


def test_join_request_is_sealed_to_the_inviter() -> None:
    inviter, other = SecretKey.generate(), SecretKey.generate()
    req = JoinRequest(b"g" * 32, b"s" * 16, b"kp", b"p" * 32, b"e" * 32, ("127.0.0.1:1",))
    sealed = req.seal(inviter.public)
    assert b"s" * 16 not in sealed
    assert JoinRequest.open(inviter, sealed) == req
    with pytest.raises(DecodeError):
        JoinRequest.open(other, sealed)
    with pytest.raises(DecodeError):
        JoinRequest.open(inviter, sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_a_ticket_from_before_roles_parses_as_a_writer_invite() -> None:
    """Tickets printed before roles existed end without the role field: they still parse, as
    the writer invites they were (the inviter adds with the role it recorded anyway)."""
    t = InviteTicket(b"g" * 32, b"h" * 32, b"k" * 32, b"e" * 32, ("127.0.0.1:2",),
                     (SyncnodeEntry(b"n" * 32, ("127.0.0.1:1",)),), b"s" * 16, 123, "notes",
                     Role.READER)
    fields = msgpack.unpackb(encode_struct(t))
    assert fields[-1] == Role.READER
    old = INVITE_PREFIX + base64.b32encode(msgpack.packb(fields[:-1])).decode().rstrip("=").lower()
    parsed = InviteTicket.parse(old)
    assert parsed.role is Role.WRITER and parsed.name == "notes" and parsed.secret == t.secret


def test_rotation_is_due_after_the_time_or_the_messages_whichever_first() -> None:
    week = 7 * 86400.0
    assert rotation_wait(100.0, 100.0, 0, after=week, after_messages=10) == week
    assert rotation_wait(100.0 + week - 5, 100.0, 3, after=week, after_messages=10) == 5.0
    assert rotation_wait(100.0 + week + 1, 100.0, 0, after=week, after_messages=10) == 0.0
    assert rotation_wait(101.0, 100.0, 10, after=week, after_messages=10) == 0.0  # messages
    assert rotation_wait(101.0, 100.0, 9, after=0, after_messages=10) == float("inf")
    assert rotation_wait(101.0, 100.0, 10**6, after=0, after_messages=0) is None  # off
    assert 0.1 <= rotation_jitter(1.0) <= rotation_jitter(week) == 30.0


def test_mls_storage_keeps_the_newest_epochs_and_writes_within_an_epoch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The binding's writes: a new epoch prunes records beyond ``retention``; a write within
    an epoch (every send and receive ratchets the current one) updates it and prunes nothing."""
    from types import SimpleNamespace

    from device.mls import SqliteGroupStorage
    from device.store import Store

    store = Store(tmp_path)
    mls = SqliteGroupStorage(store.db, retention=2)
    gid = b"g" * 32

    def rec(epoch: int, data: bytes) -> SimpleNamespace:
        return SimpleNamespace(id=epoch, data=data)

    for epoch in range(1, 6):
        mls.write(gid, b"s%d" % epoch, [rec(epoch, b"e%d" % epoch)], [])
    kept = [r[0] for r in store.db.execute(
        "SELECT epoch_id FROM mls_epochs WHERE group_id=? ORDER BY epoch_id", (gid,))]
    assert kept == [4, 5]
    mls.write(gid, b"s5'", [], [rec(5, b"e5'")])
    assert mls.state(gid) == b"s5'" and mls.epoch(gid, 5) == b"e5'" and mls.epoch(gid, 4) == b"e4"
    assert mls.max_epoch_id(gid) == 5
