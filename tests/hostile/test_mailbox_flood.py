"""Issue 14, findings 1 and 6, against real ``syncnode run`` processes: junk join requests no
longer block joins, and nobody can fill a syncnode's disk through the mailbox.

Finding 1: join requests used to go to the inviter's own key, which is in every ticket and
manifest; 64 junk requests per syncnode blocked every join to the inviter's documents for a
week. Now they go to each invite's box (a key pair derived from the ticket's secret) with the
box key's proof, so a stranger's junk is refused before it is stored.

Finding 6: recipients were free to invent, so the per-recipient cap bounded nothing. Now only a
proven join request (small, capped per box, per endpoint and in a node-wide share whose oldest
items make room) or a member of a hosted group (capped per key) can put, every endpoint spends a
token bucket of bytes, and the whole mailbox has a byte quota.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from device.agent import Device
from proto.handoff import invite_box
from proto.identity import SecretKey
from proto.invite import InviteTicket, JoinRequest
from proto.messages import ErrorCode
from proto.rpc import RemoteError
from proto.service import MAX_JOIN_REQUEST, MailboxKind, put_proof
from syncnode.procs import NodeProcess, start_cluster
from syncnode.storage import MAILBOX_ITEM_OVERHEAD
from tests.device_kit import FAST
from tests.hostile.kit import disk_bytes, stranger
from tests.syncnode_kit import Device as KitDevice
from tests.syncnode_kit import new_group

MiB = 1024 * 1024
KP = MailboxKind.KEY_PACKAGE
HANDOFF = MailboxKind.STATE_HANDOFF
WEEK = 7 * 24 * 3600
ITEM = 256 * 1024 - 64
"""A member's flood item (the largest payload that fits a put)."""


def refusals(node: NodeProcess) -> dict[str, float]:
    """``syncnode_refused_total{reason=...}`` from the node's /metrics, by reason."""
    status, text = node.get("/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith('syncnode_refused_total{reason="'):
            out[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return out


def junk_request(inviter: bytes) -> bytes:
    """A well-formed join request sealed to ``inviter``, for a group nobody has."""
    return JoinRequest(secrets.token_bytes(32), secrets.token_bytes(16),
                       secrets.token_bytes(600), SecretKey.generate().public,
                       SecretKey.generate().public, ()).seal(inviter)


async def refused_with(code: ErrorCode, call: object) -> None:
    with pytest.raises(RemoteError) as err:
        await call  # type: ignore[misc]
    assert err.value.code == code, err.value


async def timed_join(device: Device, ticket: str, steps: list[str] | None = None) -> float:
    start = trio.current_time()
    with trio.fail_after(90):
        await device.join(ticket, progress=None if steps is None else steps.append)
    return trio.current_time() - start


async def test_junk_join_requests_do_not_block_joins(tmp_path: Path,
                                                     nodes: list[NodeProcess]) -> None:
    tickets = [n.ticket for n in nodes if n.ticket is not None]
    async with Device.open(tmp_path / "a", config=FAST) as a, \
            Device.open(tmp_path / "b", config=FAST) as b, \
            Device.open(tmp_path / "c", config=FAST) as c:
        doc = await a.create_document(tickets)
        doc.change(lambda e: e.map("m").insert("k", "v"))
        normal = await timed_join(b, doc.invite())

        ticket = doc.invite()
        box = invite_box(InviteTicket.parse(ticket).secret)
        other_box = invite_box(secrets.token_bytes(16))
        for node in nodes:
            assert node.ticket is not None
            elsewhere = next(n.ticket for n in nodes if n is not node and n.ticket)
            async with stranger(node) as (s, _):
                for _ in range(70):  # more than the inviter ever read at once before
                    junk = junk_request(a.key.public)
                    # To the inviter's key (the old way in) and to the invite's box, unproven.
                    await refused_with(ErrorCode.UNAUTHORIZED,
                                       s.mailbox_put(a.key.public, KP, junk, WEEK))
                    await refused_with(ErrorCode.UNAUTHORIZED,
                                       s.mailbox_put(box.public, KP, junk, WEEK))
                # A proof made for another syncnode (a replay by a malicious one) or by another
                # box's key does not count here either.
                junk = junk_request(a.key.public)
                await refused_with(ErrorCode.UNAUTHORIZED, s.mailbox_put(
                    box.public, KP, junk, WEEK,
                    proof=put_proof(box, elsewhere.node_id, KP, junk, WEEK)))
                await refused_with(ErrorCode.UNAUTHORIZED, s.mailbox_put(
                    box.public, KP, junk, WEEK,
                    proof=put_proof(other_box, node.ticket.node_id, KP, junk, WEEK)))
            assert refusals(node).get("mailbox_unproven", 0) >= 142

        # Someone who got hold of the ticket fills most of its box with junk that does not
        # open: the inviter reads every page and drops it.
        async with stranger(nodes[0]) as (s, _):
            for _ in range(12):
                junk = os.urandom(2000)
                await s.mailbox_put(box.public, KP, junk, WEEK,
                                    proof=put_proof(box, s.node_id, KP, junk, WEEK))

        attacked = await timed_join(c, ticket)
        assert {m.id for m in doc.members()} == {a.id, b.id, c.id}
        async with stranger(nodes[0]) as (s, _):
            await s.authenticate(box)
            with trio.fail_after(10):  # every item handled or dropped
                while (await s.mailbox_fetch(box.public)).items:  # noqa: ASYNC110 - remote state
                    await trio.sleep(0.1)
    print(f"join: normal {normal:.2f} s, with junk on every syncnode {attacked:.2f} s")
    assert attacked < max(5 * normal, normal + 3.0), (normal, attacked)


LIMITS = """\
max_mailbox_bytes = 33554432
max_join_request_bytes = 4194304
max_mailbox_bytes_per_sender = 8388608
mailbox_put_burst_bytes = 16777216
mailbox_put_bytes_per_second = 1048576.0
"""
QUOTA = 32 * MiB


def configured_cluster(root: Path, limits: str) -> list[NodeProcess]:
    for i in range(3):
        node = NodeProcess(root / f"node{i}")
        node.init()
        (node.data_dir / "syncnode.toml").write_text("[limits]\n" + limits)
    return start_cluster(root, 3)


async def flood_as_stranger(node: NodeProcess) -> None:
    """Everything a stranger (no member of any group here) can try from one endpoint."""
    async with stranger(node) as (s, _):
        await s.authenticate(SecretKey.generate())  # any key: it makes no one a member
        big = os.urandom(200 * 1024)
        for kind in (HANDOFF, MailboxKind.WELCOME, MailboxKind.JOIN_REFUSED):
            for _ in range(5):
                await refused_with(ErrorCode.UNAUTHORIZED, s.mailbox_put(
                    SecretKey.generate().public, kind, big, WEEK))
                await refused_with(ErrorCode.UNAUTHORIZED, s.mailbox_put(
                    SecretKey.generate().public, kind, big, WEEK,
                    group_id=secrets.token_bytes(32)))
        box = invite_box(secrets.token_bytes(16))  # a box of its own making
        too_big = os.urandom(MAX_JOIN_REQUEST + 1)
        await refused_with(ErrorCode.INVALID, s.mailbox_put(
            box.public, KP, too_big, WEEK, proof=put_proof(box, s.node_id, KP, too_big, WEEK)))
        stored = 0
        for _ in range(40):  # proven requests to boxes it invents: capped per endpoint
            box = invite_box(secrets.token_bytes(16))
            data = os.urandom(MAX_JOIN_REQUEST)
            try:
                await s.mailbox_put(box.public, KP, data, WEEK,
                                    proof=put_proof(box, s.node_id, KP, data, WEEK))
                stored += 1
            except RemoteError as exc:
                assert exc.code == ErrorCode.QUOTA_EXCEEDED
        assert stored == 32


async def flood_as_member(node: NodeProcess, member: KitDevice, seconds: float = 0.0
                          ) -> dict[str, int]:
    """A member of its own group puts 256 KiB items for made-up recipients until refused
    ``RATE_LIMITED`` (or for ``seconds`` more). Counts replies by outcome."""
    assert node.ticket is not None
    g = new_group(member, [node.entry])
    seen: dict[str, int] = {}
    async with stranger(node) as (s, _):
        await s.authenticate(member.key)
        assert (await s.register_group(g.values[0])).created
        data = os.urandom(ITEM)
        while True:
            try:
                await s.mailbox_put(SecretKey.generate().public, HANDOFF, data, WEEK,
                                    group_id=g.group_id)
                outcome = "stored"
            except RemoteError as exc:
                outcome = exc.code.name
                if exc.code == ErrorCode.RATE_LIMITED:
                    seen[outcome] = seen.get(outcome, 0) + 1
                    break
            seen[outcome] = seen.get(outcome, 0) + 1
    return seen


async def test_mailbox_flood_is_bounded_and_handoffs_still_work(tmp_path: Path) -> None:
    nodes = configured_cluster(tmp_path / "nodes", LIMITS)
    try:
        before = [disk_bytes(n) for n in nodes]
        # A stranger on each syncnode, then many strangers (fresh endpoints) on the first: the
        # join-request share fills and its oldest items go; nothing else gets in.
        for node in nodes:
            await flood_as_stranger(node)
        for _ in range(4):
            await flood_as_stranger(nodes[0])
        # One member (of a group of its own) on each syncnode: its key's budget, then its
        # endpoint's, stop it.
        flooder = KitDevice("flooder")
        for node in nodes:
            seen = await flood_as_member(node, flooder)
            assert seen["stored"] == 8 * MiB // (ITEM + MAILBOX_ITEM_OVERHEAD)  # its 8 MiB
            assert seen["QUOTA_EXCEEDED"] >= 1 and seen["RATE_LIMITED"] == 1, seen

        # An honest join still works, and takes the document from the copy its inviter
        # staged in its mailbox on the syncnodes (no direct transfer here).
        tickets = [n.ticket for n in nodes if n.ticket is not None]
        steps: list[str] = []
        async with Device.open(tmp_path / "a", config=FAST) as a, \
                Device.open(tmp_path / "b", config=replace(FAST, p2p_state_transfer=False)
                            ) as b:
            doc = await a.create_document(tickets)
            doc.change(lambda e: e.text("t").insert(0, "x" * 100_000))
            joined_in = await timed_join(b, doc.invite(), steps)
            assert b.document(doc.id[:16]).value() == doc.value()
        assert any("copy stored on the syncnodes" in s for s in steps), steps

        # Many members (each its own key and endpoint) fill the first syncnode's quota: it
        # refuses more, and its disk stays bounded.
        results = [await flood_as_member(nodes[0], KitDevice(f"m{i}")) for i in range(4)]
        assert any(r.get("QUOTA_EXCEEDED", 0) for r in results)
        reasons = refusals(nodes[0])
        for reason in ("mailbox_not_member", "mailbox_join_too_large", "mailbox_sender_quota",
                       "mailbox_join_evicted", "mailbox_rate", "mailbox_node_quota"):
            assert reasons.get(reason, 0) >= 1, (reason, reasons)
        grown = [disk_bytes(n) - b0 for n, b0 in zip(nodes, before, strict=True)]
        print(f"join under flood {joined_in:.2f} s; disk growth (MiB): "
              f"{[round(g / MiB, 1) for g in grown]}; quota {QUOTA / MiB:.0f} MiB; "
              f"refusals on the first: { {k: v for k, v in reasons.items() if 'mailbox' in k} }")
        for g in grown:
            assert g <= 1.25 * QUOTA + 8 * MiB, grown
    finally:
        for n in nodes:
            n.stop()


async def test_a_box_holds_16_requests_read_by_pages(nodes: list[NodeProcess]) -> None:
    """The 16 requests a box may hold come back over pages of any size; acked, they go."""
    node = nodes[0]
    box = invite_box(secrets.token_bytes(16))
    async with stranger(node) as (s, _):
        ids = []
        for i in range(16):
            data = bytes([i]) * 1000
            ids.append(await s.mailbox_put(box.public, KP, data, 600,
                                           proof=put_proof(box, s.node_id, KP, data, 600)))
        data = b"x"
        await refused_with(ErrorCode.QUOTA_EXCEEDED, s.mailbox_put(
            box.public, KP, data, 600, proof=put_proof(box, s.node_id, KP, data, 600)))
        await s.authenticate(box)
        got, after = [], 0
        while True:
            page = await s.mailbox_fetch(box.public, after, 5)
            got += [i.item_id for i in page.items]
            if not page.more:
                break
            after = page.items[-1].item_id
        assert got == ids
        assert await s.mailbox_ack(box.public, ids) == 16
        assert (await s.mailbox_fetch(box.public)).items == ()
