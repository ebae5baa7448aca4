"""``syncnode dev-cluster``: N real ``syncnode run`` processes on loopback, in the foreground.

Each node has its own data dir (``DIR/node1``, ``DIR/node2``, ...), initialised on first use
(``run --init``), so a second start reuses the keys, the databases and, with ``--base-port`` or
thanks to the remembered port, the addresses: the tickets stay the same. The tickets go to
stdout, one per line, then a ready-to-paste ``syncdevice create`` line; everything else goes to
stderr. Each node's logs go to ``stderr.log`` in its data dir.

On SIGINT or SIGTERM every child is sent SIGINT (their graceful stop), waited for, and killed
after :data:`~syncnode.procs.STOP_TIMEOUT` seconds. If a child exits on its own, the others are
stopped the same way and the exit code is 1. Children are addressed by the pids this process
started, nothing else.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from syncnode.procs import START_TIMEOUT, STOP_TIMEOUT, NodeProcess

POLL = 0.1
INTERRUPTED = 130


def node_addresses(i: int, base_port: int | None) -> tuple[str, str]:
    """``(listen, http)`` of node ``i`` (0-based): UDP ``base+2i`` for iroh and TCP ``base+2i+1``
    for HTTP, like the 7600/7601 defaults, or any free ports (remembered across restarts)."""
    if base_port is None:
        return "127.0.0.1:0", "127.0.0.1:0"
    return f"127.0.0.1:{base_port + 2 * i}", f"127.0.0.1:{base_port + 2 * i + 1}"


class DevCluster:
    def __init__(self, root: Path, n: int, base_port: int | None,
                 out: Callable[[str], None], err: Callable[[str], None]) -> None:
        self.root = root
        self.out = out
        self.err = err
        self.stop_signal: int | None = None
        self.nodes: list[tuple[str, NodeProcess]] = []
        for i in range(n):
            listen, http = node_addresses(i, base_port)
            name = f"node{i + 1}"
            self.nodes.append((name, NodeProcess(root / name, ["--init"], listen=listen,
                                                 http_listen=http)))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum

    def run(self) -> int:
        """Start, print the tickets, wait for a signal or a child's death, stop; exit code."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        code: int | None = 1
        try:
            code = self._start()
            if code is None:
                code = self._watch()
        finally:
            code = self._stop_all(1 if code is None else code)
            for s, handler in previous.items():
                signal.signal(s, handler)
        return code

    def _start(self) -> int | None:
        self.root.mkdir(parents=True, exist_ok=True)
        for _, node in self.nodes:
            node.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(self.nodes)
        while waiting:
            if self.stop_signal is not None:
                self.err(f"dev-cluster: {signal.Signals(self.stop_signal).name} during start-up")
                return 0
            for name, node in list(waiting):
                if node.wait_ready(0):
                    waiting.remove((name, node))
                elif node.proc is not None and node.proc.poll() is not None:
                    self.err(f"dev-cluster: {name} failed to start: {node.last_error()}")
                    return 1
            if waiting and time.monotonic() > deadline:
                self.err(f"dev-cluster: {waiting[0][0]} did not start within {START_TIMEOUT:.0f}"
                         f" s; see {waiting[0][1].data_dir / 'stderr.log'}")
                return 1
            time.sleep(POLL)
        tickets = [str(node.ticket) for _, node in self.nodes]
        for t in tickets:
            self.out(t)
        self.out("syncdevice create " + " ".join(f"--syncnode {t}" for t in tickets))
        self.err(f"dev-cluster: {len(self.nodes)} syncnodes running, data in {self.root}; "
                 f"Ctrl-C stops them")
        for name, node in self.nodes:
            assert node.proc is not None and node.ticket is not None
            self.err(f"  {name}  pid {node.proc.pid}  udp {', '.join(node.ticket.addrs)}  "
                     f"{node.http}/metrics  log {node.data_dir / 'stderr.log'}")
        return None

    def _watch(self) -> int:
        while self.stop_signal is None:
            for name, node in self.nodes:
                assert node.proc is not None
                code = node.proc.poll()
                if code is not None and self.stop_signal is None:
                    how = (f"was killed by {signal.Signals(-code).name}" if code < 0
                           else f"exited with code {code}")
                    said = node.last_error()
                    why = f" ({said})" if said and not said.startswith("{") else ""
                    self.err(f"dev-cluster: {name} (pid {node.proc.pid}) {how}{why}; stopping "
                             f"the others (its log: {node.data_dir / 'stderr.log'})")
                    return 1
            time.sleep(POLL)
        self.err(f"dev-cluster: {signal.Signals(self.stop_signal).name}, stopping "
                 f"{len(self.nodes)} syncnodes")
        return 0

    def _stop_all(self, code: int) -> int:
        """SIGINT to every child still running, wait (shared deadline), SIGKILL stragglers."""
        running = [(n, p) for n, p in self.nodes if p.proc is not None and p.proc.poll() is None]
        for _, node in running:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, node in running:
            assert node.proc is not None
            try:
                rc = node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(10)
                self.err(f"dev-cluster: {name} did not stop within {STOP_TIMEOUT:.0f} s; killed")
                code = 1
                continue
            if rc not in (0, INTERRUPTED, -signal.SIGINT):  # the last two: while starting up
                self.err(f"dev-cluster: {name} stopped with code {rc}: {node.last_error()}")
                code = 1
        return code
