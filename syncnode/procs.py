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
STOP_TIMEOUT = 15.0


@dataclass
class NodeProcess:
    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    listen: str = "127.0.0.1:0"
    http_listen: str = "127.0.0.1:0"
    command: list[str] = field(default_factory=lambda: list(SYNCNODE))
    """How to invoke ``syncnode`` (tests use the installed console script)."""
    proc: subprocess.Popen[str] | None = None
    ticket: NodeTicket | None = None
    http: str = ""
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    _log_start: int = 0

    def init(self) -> None:
        subprocess.run([*self.command, "init", "--data-dir", str(self.data_dir)], check=True,
                       capture_output=True, text=True, timeout=60)

    def start(self) -> NodeProcess:
        """Start ``syncnode run`` and wait until it printed its ticket."""
        self.spawn()
        if not self.wait_ready(START_TIMEOUT):
            self.stop()
            raise RuntimeError(f"syncnode did not start: {self.lines}\n"
                               f"{(self.data_dir / 'stderr.log').read_text()[-3000:]}")
        return self

    def spawn(self) -> None:
        """Start ``syncnode run`` without waiting (see :meth:`wait_ready`); stdout is read by a
        thread into :attr:`lines`, stderr is appended to ``stderr.log`` in the data dir."""
        self.lines = []
        self.ticket = None
        self.ready = threading.Event()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log = self.data_dir / "stderr.log"
        self._log_start = log.stat().st_size if log.exists() else 0
        with open(log, "a") as err:
            self.proc = subprocess.Popen(
                [*self.command, "run", "--data-dir", str(self.data_dir), "--listen", self.listen,
                 "--http", self.http_listen, *self.extra_args],
                stdout=subprocess.PIPE, stderr=err, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # Its own session: a Ctrl-C at the terminal reaches only the parent, which
                # stops the node with one SIGINT (two in a row cut its graceful stop short).
                start_new_session=True)
        threading.Thread(target=self._pump, args=(self.proc, self.lines, self.ready),
                         daemon=True).start()

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: list[str], ready: threading.Event) -> None:
        """Collect one run's stdout (its own list: a restart does not mix two runs)."""
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("data dir:"):
                ready.set()
        ready.set()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the node printed its ticket within ``timeout`` s (False: it exited or is
        still starting; :attr:`proc` tells which)."""
        if not self.ready.wait(timeout) or self.proc is None or self.proc.poll() is not None:
            return False
        for line in self.lines:
            key, _, value = line.partition(":")
            if key == "ticket":
                self.ticket = NodeTicket.parse(value.strip())
            elif key == "http":
                self.http = value.strip().removesuffix("/metrics")
        return self.ticket is not None

    def last_error(self) -> str:
        """The last line this run wrote to stderr (a failed start prints one line)."""
        try:
            with open(self.data_dir / "stderr.log", "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else ""

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

    def interrupt(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGINT (graceful stop), then SIGKILL if it has not exited after ``timeout`` s.
        Returns the exit code of the graceful stop, None if it had to be killed."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def info(self) -> dict[str, object]:
        out = subprocess.run([*self.command, "info", "--data-dir", str(self.data_dir), "--json"],
                             check=True, capture_output=True, text=True, timeout=60)
        result: dict[str, object] = json.loads(out.stdout)
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_cluster(root: Path, n: int = 3, extra_args: list[str] | None = None
                  ) -> list[NodeProcess]:
    """Initialise (if needed) and start ``n`` nodes in ``root/node0..``, in parallel."""
    nodes = [NodeProcess(root / f"node{i}", list(extra_args or [])) for i in range(n)]
    for node in nodes:
        if not (node.data_dir / "node.key").exists():
            node.init()
    for node in nodes:
        node.spawn()
    try:
        for node in nodes:
            if not node.wait_ready(START_TIMEOUT):
                raise RuntimeError(f"syncnode did not start: {node.lines}\n"
                                   f"{(node.data_dir / 'stderr.log').read_text()[-3000:]}")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes
