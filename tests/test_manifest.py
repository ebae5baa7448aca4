"""Manifest chain validation and the MLS commit parser, against commits made by real MLS."""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.errors import DecodeError
from proto.manifest import (
    LogValue,
    ManifestError,
    Role,
    Rule,
    SyncnodeEntry,
    may_send,
    next_manifest,
    sign_value,
    validate_genesis,
    validate_transition,
)
from proto.mls_wire import parse_commit
from tests.syncnode_kit import Device, Group, add_value, new_group, remove_value, update_value

NODES = (SyncnodeEntry(b"\1" * 32, ("127.0.0.1:1",)), SyncnodeEntry(b"\2" * 32, ()))


def _advance(g: Group, value: LogValue, *joiners: Device) -> None:
    validate_transition(g.manifest, value)
    g.values.append(value)
    committer = next(x for x in _devices if x.key_fpr == value.signer)
    committer.mls.apply(value.commit)
    for j in joiners:
        j.mls.join(value.welcome)


_devices: list[Device] = []


def _dev(name: str) -> Device:
    d = Device(name)
    _devices.append(d)
    return d


def test_chain_with_adds_removes_and_leaf_reuse() -> None:
    a, b, c, d = (_dev(n) for n in "abcd")
    g = new_group(a, NODES)
    validate_genesis(g.group_id, g.values[0])
    _advance(g, add_value(g, a, [b, c]), b, c)
    assert [x.leaf for x in g.manifest.devices] == [0, 1, 2]
    v = remove_value(g, a, [b])
    b.mls.apply(v.commit)  # b processes its own removal (it is out afterwards)
    c.mls.apply(v.commit)
    _advance(g, v)
    v = add_value(g, a, [d])
    c.mls.apply(v.commit)
    _advance(g, v, d)
    assert g.manifest.device(d.key_fpr).leaf == 1  # MLS reused b's blank leaf
    # d's own commit names leaf 1 as sender: the manifest's leaf bookkeeping matches MLS.
    v = update_value(g, d)
    assert parse_commit(v.commit).sender_leaf == 1
    for x in (a, c):
        x.mls.apply(v.commit)
    _advance(g, v)
    assert g.manifest.epoch == 4


def test_rule_violations() -> None:
    a, b, m = _dev("a"), _dev("b"), _dev("m")
    g = new_group(a, NODES)
    _advance(g, add_value(g, a, [b]), b)
    prev = g.manifest
    good = update_value(g, b)
    validate_transition(prev, good)

    def broken(value: LogValue, rule: Rule) -> None:
        with pytest.raises(ManifestError) as err:
            validate_transition(prev, value)
        assert err.value.rule == rule, err.value

    broken(sign_value(m.key, good.manifest, good.commit), Rule.SIGNER_NOT_MEMBER)
    broken(replace(good, signature=bytes(64)), Rule.BAD_SIGNATURE)
    broken(sign_value(b.key, replace(good.manifest, prev_manifest_hash=bytes(32)), good.commit),
           Rule.BROKEN_CHAIN)
    broken(sign_value(b.key, replace(good.manifest, epoch=9), good.commit), Rule.WRONG_EPOCH)
    # The commit was made by b (leaf 1), but a signs the manifest: sender mismatch.
    broken(sign_value(a.key, good.manifest, good.commit), Rule.COMMIT_MISMATCH)
    # Non-admin b changes the syncnodes or promotes itself.
    broken(sign_value(b.key, replace(good.manifest, syncnodes=NODES[:1]), good.commit),
           Rule.NOT_ADMIN)
    promoted = tuple(replace(x, role=Role.ADMIN) for x in good.manifest.devices)
    broken(sign_value(b.key, replace(good.manifest, devices=promoted), good.commit),
           Rule.NOT_ADMIN)
    # A roster that silently drops a device the commit keeps.
    broken(sign_value(b.key, replace(good.manifest, devices=good.manifest.devices[:1]),
                      good.commit), Rule.ROSTER_MISMATCH)
    # A commit from another epoch (replayed) does not match.
    old = next_manifest(prev, g.values[1].commit)
    broken(sign_value(a.key, old, g.values[1].commit), Rule.COMMIT_MISMATCH)


def _roles_group() -> tuple[Group, Device, Device, Device]:
    """admin a, writer w and reader r, every MLS state following the log."""
    a, w, r = _dev("ra"), _dev("rw"), _dev("rr")
    g = new_group(a, NODES)
    _advance(g, add_value(g, a, [w]), w)
    v = add_value(g, a, [r], role=Role.READER)
    w.mls.apply(v.commit)
    _advance(g, v, r)
    return g, a, w, r


def _refused(g: Group, value: LogValue, rule: Rule, says: str) -> None:
    with pytest.raises(ManifestError) as err:
        validate_transition(g.manifest, value)
    assert err.value.rule == rule and says in err.value.detail, err.value


def _role_change(g: Group, signer: Device, roles: dict[bytes, Role]) -> LogValue:
    commit = signer.mls.update()
    return sign_value(signer.key, next_manifest(g.manifest, commit, roles=roles), commit)


def test_every_member_may_update_its_own_keys() -> None:
    g, _a, w, r = _roles_group()
    assert [d.role for d in g.manifest.devices] == [Role.ADMIN, Role.WRITER, Role.READER]
    validate_transition(g.manifest, update_value(g, w))
    validate_transition(g.manifest, update_value(g, r))  # a reader too (post-compromise)


def test_non_admins_do_not_add() -> None:
    g, _a, w, r = _roles_group()
    for signer in (w, r):
        _refused(g, add_value(g, signer, [_dev("x")]), Rule.NOT_ADMIN, "only admins add")


def test_non_admins_do_not_remove() -> None:
    g, _a, w, r = _roles_group()
    _refused(g, remove_value(g, w, [r]), Rule.NOT_ADMIN, "only admins remove")
    _refused(g, remove_value(g, r, [w]), Rule.NOT_ADMIN, "only admins remove")


def test_non_admins_do_not_change_roles() -> None:
    g, _a, w, r = _roles_group()
    _refused(g, _role_change(g, r, {r.key_fpr: Role.WRITER}), Rule.NOT_ADMIN,
             "only admins change roles")  # a reader promoting itself
    _refused(g, _role_change(g, w, {r.key_fpr: Role.WRITER}), Rule.NOT_ADMIN,
             "only admins change roles")


def test_non_admins_do_not_change_syncnodes() -> None:
    g, _a, w, _r = _roles_group()
    good = update_value(g, w)
    _refused(g, sign_value(w.key, replace(good.manifest, syncnodes=NODES[:1]), good.commit),
             Rule.NOT_ADMIN, "only admins change the syncnodes")


def test_admin_changes_roles() -> None:
    g, a, w, r = _roles_group()
    v = _role_change(g, a, {r.key_fpr: Role.WRITER, w.key_fpr: Role.ADMIN})
    validate_transition(g.manifest, v)
    assert [d.role for d in v.manifest.devices] == [Role.ADMIN, Role.ADMIN, Role.WRITER]


def test_admin_changes_syncnodes() -> None:
    g, a, _w, _r = _roles_group()
    commit = a.mls.update()
    moved = next_manifest(g.manifest, commit, syncnodes=NODES[1:])
    validate_transition(g.manifest, sign_value(a.key, moved, commit))


def test_admin_adds_and_removes() -> None:
    g, a, w, _r = _roles_group()
    validate_transition(g.manifest, remove_value(g, a, [w]))
    g, a, _w, _r = _roles_group()
    validate_transition(g.manifest, add_value(g, a, [_dev("y")], role=Role.ADMIN))


def test_the_group_keeps_an_admin() -> None:
    g, a, w, _r = _roles_group()
    commit = a.mls.update()

    def value(roles: dict[bytes, Role]) -> LogValue:
        return sign_value(a.key, next_manifest(g.manifest, commit, roles=roles), commit)

    _refused(g, value({a.key_fpr: Role.WRITER}), Rule.BAD_ROSTER, "no admin left")
    # With a second admin, the first may step down.
    validate_transition(g.manifest, value({a.key_fpr: Role.WRITER, w.key_fpr: Role.ADMIN}))


def test_may_send() -> None:
    g, a, w, r = _roles_group()
    sends = {d.fingerprint: may_send(d) for d in g.manifest.devices}
    assert sends == {a.key_fpr: True, w.key_fpr: True, r.key_fpr: False}


def test_genesis_rules() -> None:
    a, b = _dev("a"), _dev("b")
    g = new_group(a, NODES)
    with pytest.raises(ManifestError) as err:
        validate_genesis(secrets.token_bytes(32), g.values[0])
    assert err.value.rule == Rule.WRONG_GROUP
    two = replace(g.values[0].manifest, devices=(*g.values[0].manifest.devices, b.entry()))
    with pytest.raises(ManifestError):
        validate_genesis(g.group_id, sign_value(a.key, two, None))
    with pytest.raises(ManifestError) as err:
        validate_genesis(g.group_id, sign_value(b.key, g.values[0].manifest, None))
    assert err.value.rule == Rule.SIGNER_NOT_MEMBER


_sample: list[bytes] = []


def _commit_sample() -> bytes:
    if not _sample:
        a, b = _dev("fa"), _dev("fb")
        g = new_group(a, NODES)
        _sample.append(add_value(g, a, [b]).commit or b"")
    return _sample[0]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parser_rejects_mutations_with_decode_error(data: st.DataObject) -> None:
    raw = bytearray(_commit_sample())
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)),
                               max_size=4))
    for pos, x in flips:
        raw[pos] ^= x
    try:
        parse_commit(bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw))
    except DecodeError:
        pass


# -- compaction points (proto/compaction.py) ---------------------------------------------------


def _point(signer: Device, vector: dict[bytes, int], seq: int, **kw: object) -> bytes:
    from proto.compaction import make_point

    point = make_point({**vector, signer.key_fpr: seq}, signer.key_fpr, seq, b"\7" * 32,
                       b"state", b"v")
    return replace(point, **kw).encode() if kw else point.encode()  # type: ignore[arg-type]


def _compacting(g: Group, signer: Device, point: bytes) -> LogValue:
    commit = signer.mls.update()
    return sign_value(signer.key, next_manifest(g.manifest, commit, compaction=point), commit)


def test_writers_and_admins_compact_and_the_point_carries_forward() -> None:
    g, a, w, r = _roles_group()
    validate_transition(g.manifest, _compacting(g, a, _point(a, {}, 3)))  # an admin
    g, a, w, r = _roles_group()
    value = _compacting(g, w, _point(w, {a.key_fpr: 5}, 3))  # a writer
    for x in (a, r):
        x.mls.apply(value.commit)
    _advance(g, value)
    # Any later commit that names no new point keeps this one (the newest manifest has it).
    nxt = update_value(g, a)
    assert nxt.manifest.compaction == value.manifest.compaction
    validate_transition(g.manifest, nxt)


def test_readers_do_not_compact() -> None:
    g, _a, _w, r = _roles_group()
    _refused(g, _compacting(g, r, _point(r, {}, 1)), Rule.READER_COMPACTS, "readers")


def test_a_point_covers_its_own_state_envelope_from_the_committer() -> None:
    g, a, w, _r = _roles_group()
    from proto.compaction import make_point

    other = make_point({a.key_fpr: 4}, a.key_fpr, 4, b"\7" * 32, b"s", b"v").encode()
    _refused(g, _compacting(g, w, other), Rule.BAD_COMPACTION, "committer's own envelope")
    g, a, w, _r = _roles_group()
    short = make_point({w.key_fpr: 2}, w.key_fpr, 3, b"\7" * 32, b"s", b"v").encode()
    _refused(g, _compacting(g, w, short), Rule.BAD_COMPACTION, "its own state envelope")
    g, a, w, _r = _roles_group()
    _refused(g, _compacting(g, w, b"\x00garbage"), Rule.BAD_COMPACTION, "malformed")


def test_covered_senders_are_sorted_unique_and_count_from_one() -> None:
    from proto.compaction import Covered

    g, a, w, _r = _roles_group()
    pair = sorted([Covered(a.key_fpr, 1), Covered(w.key_fpr, 2)], key=lambda c: c.sender)
    unsorted = _point(w, {}, 2, covered=tuple(reversed(pair)))
    _refused(g, _compacting(g, w, unsorted), Rule.BAD_COMPACTION, "sorted and unique")
    g, a, w, _r = _roles_group()
    zero = _point(w, {}, 2, covered=tuple(sorted(
        [Covered(a.key_fpr, 0), Covered(w.key_fpr, 2)], key=lambda c: c.sender)))
    _refused(g, _compacting(g, w, zero), Rule.BAD_COMPACTION, "count from 1")


def test_points_are_monotone_and_never_dropped() -> None:
    g, a, w, r = _roles_group()
    first = _compacting(g, w, _point(w, {a.key_fpr: 5}, 3))
    for x in (a, r):
        x.mls.apply(first.commit)
    _advance(g, first)
    a_commit, w_commit = a.mls.update(), w.mls.update()  # one pending commit each

    def by(signer: Device, commit: bytes, point: bytes | None) -> LogValue:
        m = replace(next_manifest(g.manifest, commit), compaction=point)
        return sign_value(signer.key, m, commit)

    # Covers less of a than the decided point: syncnodes deleted a's 4 and 5 already.
    _refused(g, by(a, a_commit, _point(a, {w.key_fpr: 9}, 4)), Rule.BAD_COMPACTION,
             "cover the previous one")
    # The same vector again, with another state envelope at w's covered seq 3.
    _refused(g, by(w, w_commit, _point(w, {a.key_fpr: 5}, 3, state_digest=b"\1" * 32)),
             Rule.BAD_COMPACTION, "newer than the previous point")
    _refused(g, by(a, a_commit, None), Rule.BAD_COMPACTION, "cannot be dropped")
    validate_transition(g.manifest, by(a, a_commit, _point(a, {w.key_fpr: 3}, 6)))
