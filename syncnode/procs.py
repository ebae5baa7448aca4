"""Running real ``syncnode`` daemons as subprocesses (tests, benchmarks and the demo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from proto.manifest import SyncnodeEntry
from proto.ticket import NodeTicket

SYNCNODE = [sys.executable, "-m", "syncnode"]
START_TIMEOUT = 30.0


@dataclass
class NodeProcess:
    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    ticket: NodeTicket | None = None
    http: str = ""
    lines: list[str] = field(default_factory=list)

    def init(self) -> None:
        subprocess.run([*SYNCNODE, "init", "--data-dir", str(self.data_dir)], check=True,
                       capture_output=True, text=True, timeout=60)

    def start(self) -> NodeProcess:
        self.lines = []
        self.proc = subprocess.Popen(
            [*SYNCNODE, "run", "--data-dir", str(self.data_dir), "--listen", "127.0.0.1:0",
             "--http", "127.0.0.1:0", *self.extra_args],
            stdout=subprocess.PIPE, stderr=open(self.data_dir / "stderr.log", "a"), text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("data dir:"):
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(START_TIMEOUT) or self.proc.poll() is not None:
            raise RuntimeError(f"syncnode did not start: {self.lines}\n"
                               f"{(self.data_dir / 'stderr.log').read_text()[-3000:]}")
        for line in self.lines:
            key, _, value = line.partition(":")
            if key == "ticket":
                self.ticket = NodeTicket.parse(value.strip())
            elif key == "http":
                self.http = value.strip().removesuffix("/metrics")
        return self

    @property
    def entry(self) -> SyncnodeEntry:
        assert self.ticket is not None
        return SyncnodeEntry(self.ticket.node_id, self.ticket.addrs)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def info(self) -> dict[str, object]:
        out = subprocess.run([*SYNCNODE, "info", "--data-dir", str(self.data_dir), "--json"],
                             check=True, capture_output=True, text=True, timeout=60)
        result: dict[str, object] = json.loads(out.stdout)
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_cluster(root: Path, n: int = 3, extra_args: list[str] | None = None
                  ) -> list[NodeProcess]:
    nodes = []
    for i in range(n):
        d = root / f"node{i}"
        node = NodeProcess(d, list(extra_args or []))
        node.init()
        nodes.append(node)
    for node in nodes:
        node.start()
    return nodes
