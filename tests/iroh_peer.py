"""A separate-process iroh echo peer for transport tests.

Prints one JSON line ``{"node_id": hex, "addrs": [...]}`` once listening, then echoes every frame
on every stream back to the sender until stdin closes.
"""

from __future__ import annotations

import json
import sys

import trio

from proto.errors import StreamClosed, TransportError
from proto.identity import SecretKey
from proto.transport.base import Connection, Stream
from proto.transport.iroh import IrohTransport


async def echo_stream(stream: Stream) -> None:
    try:
        while True:
            frame = await stream.receive()
            await stream.send(frame)
    except StreamClosed:
        await stream.send_eof()
    except TransportError:
        pass


async def handle(conn: Connection) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await conn.accept_stream()
            except TransportError:
                return
            nursery.start_soon(echo_stream, stream)


async def main() -> None:
    transport = await IrohTransport.bind(SecretKey.generate(), listen="127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, handle)
        print(json.dumps({"node_id": transport.node_id.hex(), "addrs": transport.addresses()}),
              flush=True)
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        while await stdin.receive_some():
            pass
        nursery.cancel_scope.cancel()
    await transport.aclose()


if __name__ == "__main__":
    trio.run(main)
