"""The operator HTTP endpoint: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus text).

A deliberately tiny server (h11 on trio, GET only, one request per connection) on its own,
by-default-loopback port, so scraping or probing never competes with the sync protocol.
"""

from __future__ import annotations

from collections.abc import Callable

import h11
import trio

from proto.logs import get_logger

log = get_logger("syncnode.http")

MAX_REQUEST = 16 * 1024
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"


class HealthServer:
    def __init__(self, metrics: Callable[[], bytes], ready: Callable[[], bool]) -> None:
        self.metrics = metrics
        self.ready = ready

    def respond(self, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ok = self.ready()
            return (200 if ok else 503), "text/plain", b"ready\n" if ok else b"not ready\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_METRICS, self.metrics()
        return 404, "text/plain", b"not found (try /healthz, /readyz, /metrics)\n"

    async def serve(self, listeners: list[trio.SocketListener], *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on already bound ``listeners`` (the daemon binds them first, so a busy port
        is a start-up error, not a crash); reports the port."""
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            with trio.move_on_after(10):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(4096)
                        conn.receive_data(data)
                        if not data:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        break
                    return
                if event.method != b"GET":
                    status, ctype, body = 405, "text/plain", b"GET only\n"
                else:
                    status, ctype, body = self.respond(event.target.decode("ascii", "replace"))
                headers = [("content-type", ctype), ("content-length", str(len(body))),
                           ("connection", "close")]
                await stream.send_all(conn.send(h11.Response(status_code=status,
                                                             headers=headers)) or b"")
                await stream.send_all(conn.send(h11.Data(data=body)) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        except (h11.RemoteProtocolError, trio.BrokenResourceError, OSError) as exc:
            log.debug("bad http request", error=str(exc))
        finally:
            await stream.aclose()
