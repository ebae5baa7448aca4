"""A device process for the real-process fault test: ``python -m tests.device_worker``.

Opens the device in HOME, makes sure its ``count`` markers NAME-0.. are in document DOC (a
restarted worker makes only those it does not find, so a SIGKILL loses nothing it had made),
then waits until the document holds ``total`` markers in all and prints the document as JSON.
"""

from __future__ import annotations

import json
import sys

import trio

from device.agent import Device, DeviceConfig

CONFIG = DeviceConfig(reconnect_min=0.05, reconnect_max=1.0, connect_timeout=3.0,
                      backfill_interval=2.0, sync_request_interval=1.0)


async def main(home: str, doc_id: str, name: str, count: int, total: int) -> None:
    async with Device.open(home, config=CONFIG) as device:
        doc = device.document(doc_id)
        have = doc.value().get("m", {})
        for i in range(count):
            marker = f"{name}-{i}"
            if marker not in have:
                doc.change(lambda e, m=marker: e.map("m").insert(m, 1))
                await trio.sleep(0.05)
        with trio.fail_after(240):
            while len(doc.value().get("m", {})) < total or doc.sync_status().outbox:  # noqa: ASYNC110 - state of several tasks
                await trio.sleep(0.2)
        print(json.dumps(doc.value(), sort_keys=True), flush=True)


if __name__ == "__main__":
    home, doc_id, name, count, total = sys.argv[1:6]
    trio.run(main, home, doc_id, name, int(count), int(total))
