"""The operator's view of ``syncnode run`` and ``syncnode dev-cluster``: the installed console
script as a separate process, real iroh on loopback, real signals.

One daemon per data dir, no silent key creation, the same ticket after a restart, one-line
errors for user mistakes, a clean exit on SIGINT, and a dev cluster that stops every child."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from proto.identity import SecretKey
from proto.rpc import SyncnodeClient
from proto.ticket import NodeTicket
from proto.transport.iroh import IrohTransport
from syncnode.procs import NodeProcess

BIN = Path(sys.executable).parent
SYNCNODE = str(BIN / "syncnode")
TIMEOUT = 60


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYNCNODE, *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, **(env or {})})


def node(d: Path, *extra: str, listen: str = "127.0.0.1:0") -> NodeProcess:
    return NodeProcess(d, list(extra), listen=listen, command=[SYNCNODE])


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(n: NodeProcess) -> int:
    """SIGINT, as an operator's Ctrl-C; the exit code of the graceful stop."""
    rc = n.interrupt(20)
    assert rc is not None, "did not stop within 20 s after SIGINT"
    return rc


def test_run_refuses_an_uninitialised_data_dir(tmp_path: Path) -> None:
    d = tmp_path / "node1"
    r = run_cli("run", "--data-dir", str(d), "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0")
    assert_one_line_error(r, "not initialised", f"syncnode init --data-dir {d}", "--init")
    assert not d.exists()  # nothing created: no key, no database, no lock file


@pytest.mark.parametrize("flag, value, needle", [
    ("--listen", "nonsense", "is not IP:PORT"),
    ("--listen", "127.0.0.1:99999", "port must be 0-65535"),
    ("--listen", "localhost:7600", "is not IP:PORT"),
    ("--listen", "::1:7600", "brackets"),
    ("--http", "127.0.0.1:http", "port must be 0-65535"),
])
def test_malformed_addresses_are_one_line_errors(tmp_path: Path, flag: str, value: str,
                                                 needle: str) -> None:
    run_cli("init", "--data-dir", str(tmp_path))
    r = run_cli("run", "--data-dir", str(tmp_path), flag, value)
    assert_one_line_error(r, flag, repr(value), needle)
    assert "Traceback" not in r.stderr and "panicked" not in r.stderr


def test_one_daemon_per_data_dir_and_the_ticket_survives_restarts(tmp_path: Path) -> None:
    d = tmp_path / "node1"
    first = node(d, "--init")  # --init: creates the key on first use
    try:
        first.start()
        assert first.proc is not None and first.ticket is not None
        assert any(ln.startswith("created:") for ln in first.lines)
        (addr,) = first.ticket.addrs  # IPv4 only: no random-port [::1] socket in the ticket
        assert addr.startswith("127.0.0.1:")
        second = run_cli("run", "--data-dir", str(d), "--listen", "127.0.0.1:0",
                         "--http", "127.0.0.1:0")
        assert_one_line_error(second, "already running", f"pid {first.proc.pid}")
        assert first.info()["ticket"] == str(first.ticket)  # its state file was left alone
        ticket = first.ticket
        assert stop(first) == 0
    finally:
        first.stop()
    assert first.lines[-1] == "stopped"
    log = (d / "stderr.log").read_text()
    assert "Traceback" not in log and '"event": "syncnode stopped"' in log

    again, third = node(d), node(d)
    try:
        again.start()  # no --init needed now; port 0 again: the previous port is reused
        assert again.ticket == ticket
        again.kill()  # SIGKILL: the kernel releases the lock, nothing to clean up
        third.start()
        assert third.ticket == ticket
        assert third.terminate(20) == 0  # SIGTERM (systemd's stop): the same graceful stop
        assert third.lines[-2:] == ["received SIGTERM, shutting down", "stopped"]
    finally:
        again.stop()
        third.stop()


def test_fixed_port_ticket_is_stable_and_busy_ports_are_one_line_errors(tmp_path: Path
                                                                        ) -> None:
    d = tmp_path / "node1"
    assert run_cli("init", "--data-dir", str(d)).returncode == 0
    port = free_port(socket.SOCK_DGRAM)
    tickets = []
    for _ in range(2):
        n = node(d, listen=f"127.0.0.1:{port}")
        try:
            n.start()
            assert n.ticket is not None and n.ticket.addrs == (f"127.0.0.1:{port}",)
            tickets.append(n.ticket)
            assert stop(n) == 0
        finally:
            n.stop()
    assert tickets[0] == tickets[1]

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", port))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        http_port = tcp.getsockname()[1]
        r = run_cli("run", "--data-dir", str(d), "--listen", f"127.0.0.1:{port}",
                    "--http", "127.0.0.1:0")
        assert_one_line_error(r, f"UDP port {port} is already in use", "--listen")
        r = run_cli("run", "--data-dir", str(d), "--listen", "127.0.0.1:0",
                    "--http", f"127.0.0.1:{http_port}")
        assert_one_line_error(r, f"TCP port {http_port} is already in use", "--http")
        # Port 0 with the remembered port taken: a new port, said on stdout.
        n = node(d)
        try:
            n.start()
            assert n.ticket is not None and n.ticket != tickets[0]
            assert any(ln.startswith(f"note:      port {port} of the previous run is taken")
                       for ln in n.lines)
            assert stop(n) == 0
        finally:
            n.stop()


def test_help_lists_exit_codes_and_completion_scripts_print() -> None:
    for cmd in ([], ["run"], ["init"], ["info"], ["selfcheck"], ["dev-cluster"]):
        out = run_cli(*cmd, "--help").stdout
        assert "Exit codes:" in out and "  2    usage error" in out, cmd
    assert "130  interrupted" in run_cli("run", "--help").stdout
    for prog in ("syncnode", "syncdevice"):
        r = subprocess.run([str(BIN / prog)], capture_output=True, text=True, timeout=TIMEOUT,
                           env={**os.environ, f"_{prog.upper()}_COMPLETE": "bash_source"})
        assert r.returncode == 0 and f"_{prog}_completion()" in r.stdout, r.stderr


class DevCluster:
    """``syncnode dev-cluster`` as a subprocess; stdout read line by line with a deadline."""

    def __init__(self, root: Path, nodes: int) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            [SYNCNODE, "dev-cluster", "--nodes", str(nodes), "--dir", str(root)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True)  # its own process group, like a job in a terminal
        self.tickets: list[str] = []

    def wait_tickets(self) -> list[str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().strip()
            if not line:
                break
            if line.startswith("syncdevice create "):
                assert line.split()[3::2] == self.tickets
                return self.tickets
            self.tickets.append(line)
        raise AssertionError(f"no tickets: {self.tickets}")

    def child_pids(self) -> list[int]:
        return [json.loads((d / "run-state.json").read_text())["pid"]
                for d in sorted(self.root.glob("node*"))]

    def finish(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, err

    def close(self) -> None:
        """Clean up after a failure: a graceful stop first (SIGKILL would orphan the nodes),
        then SIGKILL for it and for any node it left behind (our own grandchildren, checked
        by their command line)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for d in self.root.glob("node*"):
            try:
                pid = json.loads((d / "run-state.json").read_text())["pid"]
                if str(d).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass


async def wait_tickets(cluster: DevCluster) -> list[str]:
    """Bounded even if the process prints nothing: the reading thread is abandoned, and the
    test's ``finally`` kills the process, which ends the read."""
    with trio.fail_after(TIMEOUT):
        return await trio.to_thread.run_sync(cluster.wait_tickets, abandon_on_cancel=True)


def assert_all_gone(root: Path, pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped by dev-cluster, so the pid is free
    for d in sorted(root.glob("node*")):  # and no process holds a data dir any more
        with open(d / "syncnode.lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


async def test_dev_cluster_serves_and_stops_every_child_on_sigint(tmp_path: Path) -> None:
    root = tmp_path / "dev"
    cluster = DevCluster(root, 3)
    try:
        tickets = await wait_tickets(cluster)
        assert len(tickets) == 3 and len(set(tickets)) == 3
        pids = cluster.child_pids()
        transport = await IrohTransport.bind(SecretKey.generate())
        try:
            for t in tickets:
                with trio.fail_after(30):
                    async with SyncnodeClient.connect(transport, NodeTicket.parse(t)) as c:
                        assert (await c.heads([b"\0" * 32])).heads == ()
        finally:
            await transport.aclose()
        # Ctrl-C at a terminal signals the whole foreground process group: each node must
        # still get one SIGINT only (from dev-cluster) and stop gracefully.
        os.killpg(cluster.proc.pid, signal.SIGINT)
        code, err = await trio.to_thread.run_sync(cluster.finish)
        assert code == 0, err
        assert "SIGINT, stopping 3 syncnodes" in err and "Traceback" not in err
        assert_all_gone(root, pids)
        for i in range(1, 4):
            log = (root / f"node{i}" / "stderr.log").read_text()
            assert "interrupted" not in log and "shutting down" in log, log[-2000:]
    finally:
        cluster.close()  # only does something if the test failed

    again = DevCluster(root, 3)  # same dir: same keys, remembered ports, same tickets
    try:
        assert await wait_tickets(again) == tickets
        pids = again.child_pids()
        os.kill(pids[1], signal.SIGKILL)  # a node dies: the others are stopped, exit code 1
        code, err = await trio.to_thread.run_sync(again.finish)
        assert code == 1 and f"node2 (pid {pids[1]}) was killed by SIGKILL" in err, err
        assert_all_gone(root, pids)
    finally:
        again.close()


def test_two_sigints_in_a_row_still_stop_gracefully(tmp_path: Path) -> None:
    """A terminal's Ctrl-C plus a parent forwarding it: the second SIGINT arrives while the
    node stops (it used to end with exit 130 and "interrupted while starting")."""
    node = NodeProcess(tmp_path / "n")
    node.init()
    node.start()
    assert node.proc is not None
    for gap in (0.0, 0.01):
        node.proc.send_signal(signal.SIGINT)
        time.sleep(gap)
    node.proc.send_signal(signal.SIGINT)
    assert node.proc.wait(30) == 0
    log = (tmp_path / "n" / "stderr.log").read_text()
    assert "interrupted" not in log and "Traceback" not in log, log[-2000:]
