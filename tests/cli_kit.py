"""Running the real ``syncdevice`` console script in tests (separate processes, bounded)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from proto.identity import SecretKey
from proto.ticket import NodeTicket
from syncnode.procs import NodeProcess

SYNCDEVICE = str(Path(sys.executable).with_name("syncdevice"))
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SYNCDEVICE_")}
TIMEOUT = 90


def sd(home: Path, *args: str, timeout: float = TIMEOUT, check: bool = False
       ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([SYNCDEVICE, "--home", str(home), *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def one_line_error(done: subprocess.CompletedProcess[str], code: int, text: str = "") -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert text in lines[0], lines[0]


def unreachable_syncnodes(n: int = 3) -> list[str]:
    """Valid tickets of syncnodes that do not exist (documents work offline)."""
    out = []
    for t in (NodeTicket(SecretKey.generate().public, ("127.0.0.1:9",)) for _ in range(n)):
        out += ["--syncnode", str(t)]
    return out


def real_syncnodes(nodes: list[NodeProcess]) -> list[str]:
    out = []
    for n in nodes:
        assert n.ticket is not None
        out += ["--syncnode", str(n.ticket)]
    return out


def _default_sigint() -> None:
    """In the child: SIGINT back to its default. A test run started in the background of a
    non-interactive shell (`cmd &`) inherits SIGINT ignored, and a program rightly keeps it
    so; the tests that send SIGINT want the interactive case."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def started(home: Path, *args: str, stderr: Path) -> Iterator[subprocess.Popen[str]]:
    """A long-running syncdevice command; killed (by pid) if the test leaves it running."""
    with open(stderr, "w") as err:
        proc = subprocess.Popen([SYNCDEVICE, "--home", str(home), *args], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=ENV, preexec_fn=_default_sigint)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def first_line(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output in time"
    return proc.stdout.readline()


