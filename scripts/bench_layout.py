#!/usr/bin/env python3
"""The throughput phase of ``bench_e2e.py`` with one process per device (``--layout
process-per-device``): the shape of a real deployment, where every device is its own machine,
here ten processes sharing this machine's cores with the syncnodes.

The parent sets the group up in one process (as ``bench_e2e.py`` does), closes the devices,
then starts one child per device (``python scripts/bench_layout.py child ...``), each opening
its own home. The closed loop is the same as in one process: writer ``k`` sends change ``n``
only once every reader shows change ``n - window`` of writer ``k``. Readers print their
counters when they change; the parent relays, per writer, the lowest counter over the readers
(one extra local hop on that feedback path, none on the data path). Every child reports the
CPU it used during the run; the parent sums them.

Protocol on the children's stdin/stdout, one line each: child -> parent ``READY``, ``P c0 c1
...`` (reader's counters), ``DONE sent`` (writer, at the end of the run), ``CPU seconds`` (at
``STOP``: what it used since ``GO``); parent -> child ``GO seconds``, ``M m`` (writer: lowest
reader counter of its changes), ``STOP`` (once every reader has every change).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device.agent import Device, DeviceConfig
from proto.logs import configure_logging

LINE_LIMIT = 1 << 16


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    buf = b""
    while True:
        data = await stream.receive_some(LINE_LIMIT)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode()


# -- the parent ----------------------------------------------------------------------------------

async def throughput_processes(homes: list[Path], group_id: bytes, writers: int,
                               duration: float, window: int, config: DeviceConfig
                               ) -> dict[str, float]:
    """Run the closed loop with one child process per home; the first ``writers`` write."""
    readers = len(homes) - writers
    counters = [[0] * writers for _ in range(readers)]
    relayed = [0] * writers
    ready, done = trio.Semaphore(0), trio.Semaphore(0)
    sent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    converged = trio.Event()
    procs: dict[int, trio.Process] = {}
    locks = [trio.Lock() for _ in homes]

    async def read_child(i: int, proc: trio.Process) -> None:
        assert proc.stdout is not None
        async for line in _lines(proc.stdout):
            word, *rest = line.split()
            if word == "READY":
                ready.release()
            elif word == "P":
                counters[i - writers] = [int(x) for x in rest]
                await relay()
            elif word == "DONE":
                sent[i] = int(rest[0])
                done.release()
            elif word == "CPU":
                cpu[i] = float(rest[0])
                done.release()

    async def relay() -> None:
        for k in range(writers):
            low = min(c[k] for c in counters)
            if low > relayed[k]:
                relayed[k] = low
                await tell(k, f"M {low}")
        if len(sent) >= writers and all(min(c[k] for c in counters) >= sent.get(k, 0)
                                        for k in range(writers)):
            converged.set()

    async def tell(i: int, msg: str) -> None:
        stdin = procs[i].stdin
        assert stdin is not None
        async with locks[i]:  # one writer of each pipe at a time
            await stdin.send_all(msg.encode() + b"\n")

    try:
        async with trio.open_nursery() as nursery:
            for i, home in enumerate(homes):
                role = "writer" if i < writers else "reader"
                argv = [sys.executable, __file__, "child", str(home), role, str(i),
                        group_id.hex(), str(writers), str(window), str(config.flush_interval)]
                procs[i] = await trio.lowlevel.open_process(argv, stdin=-1, stdout=-1)
                nursery.start_soon(read_child, i, procs[i])
            with trio.fail_after(120):
                for _ in homes:
                    await ready.acquire()
            t0 = time.perf_counter()
            for i in range(len(homes)):
                await tell(i, f"GO {duration}")
            with trio.fail_after(duration + 60):
                for _ in range(writers):
                    await done.acquire()
            elapsed = time.perf_counter() - t0
            await relay()
            with trio.fail_after(120):
                await converged.wait()
            converge = time.perf_counter() - t0 - elapsed
            for i in range(len(homes)):
                await tell(i, "STOP")
            with trio.fail_after(60):
                for _ in homes:
                    await done.acquire()
                for p in procs.values():
                    await p.wait()
    finally:  # a failed or interrupted run leaves no device process behind
        for p in procs.values():
            if p.returncode is None:
                p.kill()
    total = sum(sent.values())
    return {"changes": total, "seconds": elapsed, "changes_per_s": total / elapsed,
            "converge_after_s": converge, "devices_cpu_s": sum(cpu.values())}


# -- a child: one device -------------------------------------------------------------------------

async def run_child(home: Path, role: str, index: int, group_id: bytes, writers: int,
                    window: int, config: DeviceConfig) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    out = sys.stdout

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    async with Device.open(home, config=config) as device:
        doc = device.document_for(group_id)
        assert doc is not None, "the parent set the group up in this home"
        await doc.wait_connected(1)
        lines = _lines(stdin)
        say("READY")
        word, arg = (await lines.__anext__()).split()
        assert word == "GO"
        duration = float(arg)
        cpu0 = _cpu()
        if role == "writer":
            allowed = [0]
            more = trio.Event()

            async def feedback() -> None:
                nonlocal more
                async for line in lines:
                    word, *rest = line.split()
                    if word == "M":
                        allowed[0] = int(rest[0])
                        more.set()
                        more = trio.Event()
                    elif word == "STOP":
                        return

            n = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feedback)
                stop = trio.current_time() + duration
                while trio.current_time() < stop:
                    if n + 1 - window > allowed[0]:
                        with trio.move_on_at(stop):
                            await more.wait()
                        continue
                    n += 1
                    doc.change(lambda e, n=n: e.map(f"w{index}").insert("n", n))
                    await trio.lowlevel.checkpoint()
                say(f"DONE {n}")
            say(f"CPU {_cpu() - cpu0:.4f}")  # after STOP: with what it received meanwhile
            return
        last: list[int] = []
        changed = trio.Event()

        def on(_ev: Any) -> None:
            changed.set()

        doc.subscribe(on)
        stopping = trio.Event()

        async def until_stop() -> None:
            async for line in lines:
                if line.strip() == "STOP":
                    break
            stopping.set()
            changed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_stop)
            while not stopping.is_set():
                await changed.wait()
                changed = trio.Event()
                value = doc.value()
                now = [int(value.get(f"w{k}", {}).get("n", 0)) for k in range(writers)]
                if now != last:
                    last = now
                    say("P " + " ".join(map(str, now)))
        say(f"CPU {_cpu() - cpu0:.4f}")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["child"])
    ap.add_argument("home", type=Path)
    ap.add_argument("role", choices=["writer", "reader"])
    ap.add_argument("index", type=int)
    ap.add_argument("group_id")
    ap.add_argument("writers", type=int)
    ap.add_argument("window", type=int)
    ap.add_argument("flush_interval", type=float)
    args = ap.parse_args()
    configure_logging("warning")
    config = DeviceConfig(flush_interval=args.flush_interval)
    trio.run(run_child, args.home, args.role, args.index, bytes.fromhex(args.group_id),
             args.writers, args.window, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

