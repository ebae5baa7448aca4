"""Local edits that fail: a name used with another kind of container is refused (it would hide
data), and a change that fails half way keeps what it did, saved and sent like any edit."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from proto.crdt import CrdtError
from tests.device_kit import memory_cluster, memory_device


async def test_a_name_keeps_its_container_kind_and_partial_changes_are_saved(
        tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 21) as (net, _, nodes):
        async with memory_device(net, tmp_path / "a") as a:
            doc = await a.create_document([n.ticket for n in nodes], name="n")
            doc.change(lambda e: e.text("body").insert(0, "hello"))
            for wrong in (lambda e: e.map("body").insert("x", 1),
                          lambda e: e.list("body").push(1),
                          lambda e: e.counter("body").increment(1)):
                with pytest.raises(CrdtError, match="'body' is a text"):
                    doc.change(wrong)
            assert doc.value() == {"body": "hello"}

            def half(e: object) -> None:
                e.map("meta").insert("title", "kept")  # type: ignore[attr-defined]
                e.list("body").push(1)  # type: ignore[attr-defined]

            with pytest.raises(CrdtError):
                doc.change(half)
            assert doc.value() == {"body": "hello", "meta": {"title": "kept"}}
            with trio.fail_after(20):
                await doc.wait_durable()  # the part that happened was sent too
        async with memory_device(net, tmp_path / "a") as a:  # and saved
            assert a.document("n").value() == {"body": "hello", "meta": {"title": "kept"}}
