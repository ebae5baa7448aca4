"""A minority of syncnodes that is down, frozen or restarting must not slow a group (issue 14,
finding 9): with one of three ``syncnode run`` processes stopped (SIGSTOP) or killed
(SIGKILL), a key rotation (Paxos) and an edit's durability ack take at most a small multiple of
the same operation with all three up, measured in the same test; after each syncnode was
killed and restarted in turn, they complete as soon as the stale links are noticed.

The device runs with the production defaults: the timeouts under test are the real ones."""

from __future__ import annotations

import os
import signal
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from device.agent import Device, DeviceConfig
from device.document import Document
from syncnode.procs import NodeProcess
from tests.device_kit import eventually

CONFIG = DeviceConfig()
SLOWDOWN = 5.0
"""At most this many times the all-up time (plus SLACK) with one syncnode of three down."""
SLACK = 1.0
"""Seconds added to every bound: scheduling noise on a busy test machine."""
DEADLINE = 60.0
"""Fail instead of hanging when an operation does not complete at all."""


def bound(normal: float) -> float:
    return SLOWDOWN * normal + SLACK


async def timed(op: Callable[[], Awaitable[object]]) -> float:
    start = trio.current_time()
    with trio.fail_after(DEADLINE):
        await op()
    return trio.current_time() - start


def durable_edit(doc: Document) -> Callable[[], Awaitable[None]]:
    """An edit followed by its wait for a quorum's acknowledgement."""
    async def op() -> None:
        n = doc.sync_status().durable + doc.sync_status().outbox
        doc.change(lambda e: e.map("m").insert(f"k{n}", n))
        await doc.wait_durable()
    return op


async def normal_times(doc: Document) -> tuple[float, float]:
    """Median seconds of a key rotation and of an edit's durability ack, every syncnode up."""
    rotations = [await timed(doc.rotate_keys) for _ in range(3)]
    acks = [await timed(durable_edit(doc)) for _ in range(3)]
    return statistics.median(rotations), statistics.median(acks)


async def check(doc: Document, rotation: float, ack: float, when: str) -> None:
    for _ in range(3):
        took = await timed(doc.rotate_keys)
        print(f"{when}: rotation {took:.3f} s (all up: {rotation:.3f} s)")
        assert took <= bound(rotation), (
            f"{when}: rotation took {took:.3f} s, {rotation:.3f} s with all syncnodes up")
        took = await timed(durable_edit(doc))
        print(f"{when}: durability ack {took:.3f} s (all up: {ack:.3f} s)")
        assert took <= bound(ack), (
            f"{when}: durability ack took {took:.3f} s, {ack:.3f} s with all syncnodes up")


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["frozen", "killed"])
async def test_one_syncnode_down_does_not_slow_commits_or_durability(
        tmp_path: Path, nodes: list[NodeProcess], sig: signal.Signals) -> None:
    async with Device.open(tmp_path / "a", config=CONFIG) as a:
        doc = await a.create_document([n.ticket for n in nodes if n.ticket])
        with trio.fail_after(30):
            await doc.wait_connected(3)
        rotation, ack = await normal_times(doc)
        victim = nodes[2]
        assert victim.proc is not None
        os.kill(victim.proc.pid, sig)
        try:
            # Nothing told the device yet: its link to the victim still counts as up, so the
            # commits below really ask the victim, and must not wait for it.
            assert len(doc.sync_status().connected) == 3
            await check(doc, rotation, ack, f"{sig.name}, link still up")
            # Then the link is dropped (no answer) and redials, which hang: no effect either.
            await eventually(lambda: len(doc.sync_status().connected) == 2, 30,
                             "the silent syncnode's link to be dropped")
            await check(doc, rotation, ack, f"{sig.name}, link dropped")
        finally:
            if sig == signal.SIGSTOP:
                os.kill(victim.proc.pid, signal.SIGCONT)
            victim.stop()


async def test_commits_and_durability_are_prompt_after_each_syncnode_restarted_in_turn(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """A killed syncnode never closes its connections, and once restarted it cannot (its new
    process does not know them; iroh gives up on them only after 30 s). The device must notice
    such stale links within ``keepalive_timeout`` of silence and redial at once, instead of
    holding three dead links while all three syncnodes are up (it took 12 to 15 s, and rotations
    failed with Offline)."""
    async with Device.open(tmp_path / "a", config=CONFIG) as a:
        start = trio.current_time()
        doc = await a.create_document([n.ticket for n in nodes if n.ticket])
        with trio.fail_after(30):
            await doc.wait_connected(3)
        link_setup = trio.current_time() - start
        rotation, ack = await normal_times(doc)
        # Silence is noticed within keepalive_timeout (checked every eighth of it), then the
        # link redials after reconnect_min at most and is set up again like at the start.
        detect = CONFIG.keepalive_timeout * 9 / 8 + CONFIG.reconnect_min
        ops: list[tuple[str, Callable[[], Awaitable[object]], float]] = [
            ("rotation", doc.rotate_keys, rotation), ("durability ack", durable_edit(doc), ack)]
        for what, op, normal in ops:
            for node in nodes:
                node.kill()
                await trio.to_thread.run_sync(node.start)
            took = await timed(op)
            limit = detect + bound(link_setup + normal)
            print(f"after restarts: {what} {took:.3f} s (limit {limit:.3f} s, all up: "
                  f"{normal:.3f} s, link setup {link_setup:.3f} s)")
            assert took <= limit, (f"{what} after restarts took {took:.3f} s (limit {limit:.3f} "
                                   f"s; {normal:.3f} s normally, links set up in "
                                   f"{link_setup:.3f} s)")
            with trio.fail_after(DEADLINE):
                await doc.wait_connected(3)


async def test_a_commit_that_needs_a_returning_syncnode_dials_it_at_once(
        tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """Two of three syncnodes down for a while: their links back off (here up to 8 s between
    dials). When one comes back, a commit (which needs it for a quorum) dials it at once
    rather than when the backoff ends."""
    config = replace(CONFIG, connect_timeout=0.5, reconnect_min=2.0, reconnect_max=30.0)
    async with Device.open(tmp_path / "a", config=config) as a:
        start = trio.current_time()
        doc = await a.create_document([n.ticket for n in nodes if n.ticket])
        with trio.fail_after(30):
            await doc.wait_connected(3)
        link_setup = trio.current_time() - start
        rotation = statistics.median([await timed(doc.rotate_keys) for _ in range(3)])
        for node in nodes[1:]:
            node.kill()
        await eventually(lambda: len(doc.sync_status().connected) == 1, 30,
                         "the links to the killed syncnodes to be dropped")
        await trio.sleep(6.0)  # failed dials: pauses of 1-2 s, then 2-4 s, then 4-8 s
        await trio.to_thread.run_sync(nodes[2].start)
        took = await timed(doc.rotate_keys)
        limit = bound(link_setup + rotation)
        print(f"rotation needing a returning syncnode: {took:.3f} s (limit {limit:.3f} s)")
        assert took <= limit, f"the rotation took {took:.3f} s (limit {limit:.3f} s)"
