#!/usr/bin/env python3
"""Transport benchmark: iroh (syncnode's transport) vs plain trio TCP, same framing, same run.

The server runs in a separate process (as in production); both sides use trio. Measures:

* request/response RTT of a 100-byte frame (median and p99),
* 1 KiB messages per second, one write per message, and 32 messages per write.

Usage: ``python scripts/bench_transport.py [--rtt-rounds N] [--messages N]``.
Prints a table and the iroh/TCP ratios. Numbers are noisy on shared machines: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proto.errors import StreamClosed, TransportError
from proto.framing import FrameDecoder, encode_frame
from proto.identity import SecretKey
from proto.transport.base import Connection
from proto.transport.iroh import IrohTransport

RTT, BULK, END = b"R", b"B", b"END"


class TcpFramed:
    """The same length-prefixed framing over a trio TCP stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    async def send(self, frame: bytes) -> None:
        await self.stream.send_all(encode_frame(frame))

    async def send_many(self, frames: list[bytes]) -> None:
        await self.stream.send_all(b"".join(encode_frame(f) for f in frames))

    async def receive(self) -> bytes:
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            data = await self.stream.receive_some(256 * 1024)
            if not data:
                raise StreamClosed("eof")
            self.decoder.feed(data)


async def serve_stream(stream: Any) -> None:
    """Echo mode (first frame RTT) or count mode (first frame BULK)."""
    try:
        mode = await stream.receive()
        if mode == RTT:
            while True:
                await stream.send(await stream.receive())
        else:
            count = 0
            while (await stream.receive()) != END:
                count += 1
            await stream.send(str(count).encode())
    except (StreamClosed, TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def server_main(kind: str) -> None:
    async with trio.open_nursery() as nursery:
        if kind == "tcp":
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]

            async def on_tcp(s: trio.SocketStream) -> None:
                s.setsockopt(6, 1, 1)  # TCP_NODELAY, as QUIC does no Nagle either
                await serve_stream(TcpFramed(s))

            nursery.start_soon(trio.serve_listeners, on_tcp, listeners)
            info = {"addr": f"127.0.0.1:{port}"}
        else:
            t = await IrohTransport.bind(SecretKey.generate(), listen="127.0.0.1:0")

            async def on_conn(conn: Connection) -> None:
                async with trio.open_nursery() as n:
                    while True:
                        try:
                            n.start_soon(serve_stream, await conn.accept_stream())
                        except TransportError:
                            return

            await nursery.start(t.serve, on_conn)
            info = {"node_id": t.node_id.hex(), "addrs": t.addresses()}
        print(json.dumps(info), flush=True)
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        while await stdin.receive_some():
            pass
        nursery.cancel_scope.cancel()


async def measure(open_stream: Any, rtt_rounds: int, messages: int) -> dict[str, float]:
    out: dict[str, float] = {}
    s = await open_stream()
    await s.send(RTT)
    payload = b"p" * 100
    for _ in range(50):  # warm-up
        await s.send(payload)
        await s.receive()
    samples = []
    for _ in range(rtt_rounds):
        t = time.perf_counter()
        await s.send(payload)
        await s.receive()
        samples.append(time.perf_counter() - t)
    samples.sort()
    out["rtt_median_us"] = statistics.median(samples) * 1e6
    out["rtt_p99_us"] = samples[int(len(samples) * 0.99) - 1] * 1e6

    msg = b"m" * 1024
    for label, batch in (("msgs_per_s_1", 1), ("msgs_per_s_32", 32)):
        s = await open_stream()
        await s.send(BULK)
        t = time.perf_counter()
        sent = 0
        while sent < messages:
            n = min(batch, messages - sent)
            if n == 1:
                await s.send(msg)
            else:
                await s.send_many([msg] * n)
            sent += n
        await s.send(END)
        count = int(await s.receive())
        out[label] = count / (time.perf_counter() - t)
        assert count == messages, (count, messages)
    return out


def start_server(kind: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


async def client_main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for kind in ("tcp", "iroh"):
        proc, info = start_server(kind)
        try:
            if kind == "tcp":
                host, port = info["addr"].rsplit(":", 1)

                async def open_tcp(host: str = host, port: str = port) -> TcpFramed:
                    st = await trio.open_tcp_stream(host, int(port))
                    st.setsockopt(6, 1, 1)
                    return TcpFramed(st)

                results[kind] = await measure(open_tcp, args.rtt_rounds, args.messages)
            else:
                t = await IrohTransport.bind(SecretKey.generate())
                conn = await t.connect(bytes.fromhex(info["node_id"]), info["addrs"])
                results[kind] = await measure(conn.open_stream, args.rtt_rounds, args.messages)
                await conn.aclose()
                await t.aclose()
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=10)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", choices=["tcp", "iroh"], help=argparse.SUPPRESS)
    ap.add_argument("--rtt-rounds", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=20000)
    args = ap.parse_args()
    if args.serve:
        trio.run(server_main, args.serve)
        return
    print(f"transport benchmark: {args.rtt_rounds} RTT rounds, {args.messages} x 1 KiB messages,"
          " server in a separate process, loopback", flush=True)
    r = trio.run(client_main, args)
    tcp, iroh = r["tcp"], r["iroh"]
    rows = [
        ("RTT median (µs)", "rtt_median_us", "{:.0f}", "x slower"),
        ("RTT p99 (µs)", "rtt_p99_us", "{:.0f}", "x slower"),
        ("1 KiB msgs/s, 1 per write", "msgs_per_s_1", "{:,.0f}", "x of TCP"),
        ("1 KiB msgs/s, 32 per write", "msgs_per_s_32", "{:,.0f}", "x of TCP"),
    ]
    print(f"{'metric':<28}{'tcp':>12}{'iroh':>12}{'iroh/tcp':>12}")
    for label, key, fmt, _ in rows:
        print(f"{label:<28}{fmt.format(tcp[key]):>12}{fmt.format(iroh[key]):>12}"
              f"{iroh[key] / tcp[key]:>11.2f}x")
    print(f"targets: RTT ratio <= 6x -> {iroh['rtt_median_us'] / tcp['rtt_median_us']:.2f}x; "
          f"msgs/s ratio >= 0.5x -> {iroh['msgs_per_s_1'] / tcp['msgs_per_s_1']:.2f}x "
          f"(1/write), {iroh['msgs_per_s_32'] / tcp['msgs_per_s_32']:.2f}x (32/write)")


if __name__ == "__main__":
    main()
