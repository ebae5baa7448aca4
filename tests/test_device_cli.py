"""``syncdevice`` as a user meets it: the real console script, run as separate processes.

Ctrl-C, one-line errors, exit codes in ``--help``, ``--json`` on either side of the command,
no device created by a mistyped ``--home``, library logs never on stdout, progress only on a
terminal, and export/import with real syncnodes. Every wait is bounded; only processes started
here are signalled, by their pid.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import trio
from click.testing import CliRunner

from device import cli_support
from device.cli import cli
from syncnode.procs import NodeProcess
from tests.cli_kit import (
    ENV,
    SYNCDEVICE,
    TIMEOUT,
    first_line,
    one_line_error,
    real_syncnodes,
    sd,
    started,
    unreachable_syncnodes,
)


@pytest.fixture
def offline_home(tmp_path: Path) -> Path:
    """A device with one document, ``notes`` (text ``body`` = "hello"), whose syncnodes are
    unreachable."""
    home = tmp_path / "dev"
    sd(home, "init", check=True)
    created = sd(home, "create", "--name", "notes", "--wait", "0", *unreachable_syncnodes())
    assert created.returncode == 3, created.stderr  # local until a quorum registers it
    sd(home, "edit", "notes", "--text", "body", "--append", "hello", "--wait", "0", check=True)
    return home


@pytest.mark.parametrize("command", [["watch", "notes"], ["invite", "notes", "--wait", "600"]])
def test_ctrl_c_stops_quietly_with_130(offline_home: Path, tmp_path: Path,
                                       command: list[str]) -> None:
    err = tmp_path / "stderr"
    with started(offline_home, *command, stderr=err) as proc:
        line = first_line(proc)
        assert line.strip()  # the value, or the ticket
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == cli_support.INTERRUPTED
    text = err.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    if command[0] == "watch":
        assert text == ""
    # The store was closed cleanly: the next command opens it at once.
    assert sd(offline_home, "show", "notes", "--sync", "0", check=True).stdout.count("hello")


def test_user_mistakes_are_one_line_errors(offline_home: Path) -> None:
    home = offline_home
    one_line_error(sd(home, "edit", "notes", "--text", "body", "--insert", "999", "x"), 2,
                   "outside text 'body' (0..5)")
    one_line_error(sd(home, "edit", "notes", "--text", "body", "--delete", "0", "999"), 2,
                   "has 5 code points")
    one_line_error(sd(home, "edit", "notes", "--text", "body", "--delete", "2", "2",
                      "--insert", "4", "x"), 2, "(0..3)")
    assert json.loads(sd(home, "--json", "show", "notes", "--sync", "0").stdout) == {
        "body": "hello"}  # refused edits changed nothing
    one_line_error(sd(home, "--listen", "nonsense", "list"), 2, "--listen")
    one_line_error(sd(home, "--listen", "127.0.0.1:99999", "list"), 2, "--listen")
    one_line_error(sd(home, "--relay", "nonsense", "list"), 2, "--relay")
    one_line_error(sd(home, "show", "nope"), 1, "no document matches 'nope'")
    one_line_error(sd(home, "remove", "notes", "ffff"), 1)
    one_line_error(sd(home, "edit", "notes", "--list", "todo"), 2, "--push")
    one_line_error(sd(home, "frobnicate"), 2, "No such command")
    bad = sd(home, "show", "notes", "--no-such-option")
    one_line_error(bad, 2, "syncdevice show --help")


def test_json_on_either_side_and_json_errors(offline_home: Path) -> None:
    home = offline_home
    before, after = sd(home, "--json", "list"), sd(home, "list", "--json")
    assert before.returncode == after.returncode == 0
    assert json.loads(before.stdout) == json.loads(after.stdout)
    assert [d["name"] for d in json.loads(after.stdout)] == ["notes"]
    for args, code in [(["--json", "show", "nope"], 1), (["show", "nope", "--json"], 1),
                       (["--json", "--listen", "nonsense", "list"], 2),
                       (["list", "--json", "--bogus"], 2),
                       (["edit", "notes", "--json", "--text", "body", "--insert", "99", "x"],
                        2)]:
        done = sd(home, *args)
        assert done.returncode == code, (args, done.stderr)
        error = json.loads(done.stdout)  # one JSON object, nothing else
        assert set(error) == {"error", "code"} and error["code"] == code and error["error"]
        assert done.stdout.count("\n") == 1
        assert "Traceback" not in done.stderr
    assert json.loads(sd(home, "show", "nope", "--json").stdout)["error"] == \
        "no document matches 'nope'"
    # status: updates not yet on a quorum of syncnodes -> 3, also in JSON mode.
    status = sd(home, "status", "--wait", "0", "--json")
    assert status.returncode == cli_support.PENDING
    assert json.loads(status.stdout)[0]["pending"] == 1


def test_no_device_is_created_by_a_mistyped_home(tmp_path: Path) -> None:
    typo = tmp_path / "typo"
    for args in (["list"], ["show", "notes"], ["status"], ["watch", "notes"],
                 ["create", "--wait", "0", *unreachable_syncnodes(1)]):
        one_line_error(sd(typo, *args), 1, f"syncdevice init --home {typo}")
        assert not typo.exists()
    ticket = "sninv1aaaa"
    one_line_error(sd(typo, "join", ticket), 1, "join --init")
    assert not typo.exists()
    json_err = sd(typo, "--json", "list")
    assert json_err.returncode == 1 and "syncdevice init" in json.loads(json_err.stdout)["error"]
    created = sd(typo, "--json", "init", check=True)
    assert json.loads(created.stdout)["home"] == str(typo)
    assert sd(typo, "list", check=True).stdout.strip() == "no documents"
    # join --init with a malformed ticket: one line, and no device is created.
    other = tmp_path / "other"
    one_line_error(sd(other, "join", "--init", ticket, "--timeout", "5"), 1, "bad invite ticket")
    assert not other.exists()  # a malformed ticket is refused before --init creates anything


def test_help_lists_exit_codes() -> None:
    group = subprocess.run([SYNCDEVICE, "--help"], capture_output=True, text=True,
                           timeout=TIMEOUT, env=ENV)
    assert group.returncode == 0
    status = subprocess.run([SYNCDEVICE, "status", "--help"], capture_output=True, text=True,
                            timeout=TIMEOUT, env=ENV)
    for text in (group.stdout, status.stdout):
        assert "Exit codes:" in text
        for code in ("0    ok", "1    error", "2    usage error", "3    pending",
                     "130  interrupted"):
            assert code in text, (code, text)
    assert "exits with code 3" in status.stdout
    join = subprocess.run([SYNCDEVICE, "join", "--help"], capture_output=True, text=True,
                          timeout=TIMEOUT, env=ENV)
    assert "--init" in join.stdout and "--json" in join.stdout
    runner = CliRunner()
    for name in cli.commands:  # every command, in-process (cheap)
        out = runner.invoke(cli, [name, "--help"]).output
        assert "Exit codes:" in out and "130  interrupted" in out, name
        assert "--json" in out, name


def test_library_logs_never_go_to_stdout() -> None:
    """An app that imports the library and never configures logging: nothing on its stdout;
    its own stdlib logging set-up receives the records."""
    code = """
import logging, sys
import device.agent
from proto.logs import get_logger
log = get_logger("device.test")
log.warning("plain warning", key=1)
log.info("dropped")
print("app output")
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s|%(message)s")
log.bind(more=2).info("handled by the app", key=3)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT, env=ENV, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "app output\n"
    assert "plain warning key=1" in done.stderr and "dropped" not in done.stderr
    assert "device.test|handled by the app more=2 key=3" in done.stderr


def run_on_tty(home: Path, *args: str) -> tuple[int, str, bytes]:
    """Run with stderr on a pseudo-terminal (stdout piped): (exit code, stdout, terminal)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([SYNCDEVICE, "--home", str(home), *args], stdout=subprocess.PIPE,
                            stderr=slave, text=True,
                            env={**ENV, "TERM": "xterm", "COLUMNS": "100"})
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    return proc.returncode, out, seen


def test_progress_only_on_a_terminal(offline_home: Path) -> None:
    code, out, tty = run_on_tty(offline_home, "show", "notes", "--sync", "1")
    assert code == 0 and json.loads(out) == {"body": "hello"}
    assert b"fetching news from the syncnodes" in tty
    code, out, tty = run_on_tty(offline_home, "create", "--name", "n2", "--wait", "1",
                                *unreachable_syncnodes())
    assert code == 3 and out.startswith("created n2 ")  # 3: local until a quorum has it
    assert b"registering it with its syncnodes" in tty
    code, out, tty = run_on_tty(offline_home, "--json", "show", "notes", "--sync", "1")
    assert code == 0 and tty == b""  # --json: nothing extra
    piped = sd(offline_home, "show", "notes", "--sync", "1", check=True)
    assert piped.stderr == ""


def test_too_slow_becomes_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """trio.TooSlowError from the library (join --timeout did this) is a one-line error that
    names the option."""
    home = tmp_path / "dev"
    sd(home, "init", check=True)

    @click.command()
    @click.option("--timeout", default=2.5)
    @cli_support.pass_ctx
    def slow(ctx: cli_support.Ctx, timeout: float) -> None:
        async def go(_device: object) -> None:
            with trio.fail_after(0):
                await trio.sleep(1)

        cli_support.run_device(ctx, go)

    cli.add_command(slow)
    try:
        with pytest.raises(SystemExit) as exited:
            cli_support.main(cli, ["--home", str(home), "slow"])
    finally:
        cli.commands.pop("slow")
    assert exited.value.code == 1
    assert capsys.readouterr().err == "Error: timed out after 2.5 s (--timeout)\n"


def test_export_import_round_trip_and_join_timeout(tmp_path: Path,
                                                   nodes: list[NodeProcess]) -> None:
    a, b, c, d = (tmp_path / x for x in "abcd")
    tickets = real_syncnodes(nodes)
    for home in (a, b):
        sd(home, "init", check=True)
    sd(a, "create", "--name", "notes", *tickets, check=True)
    sd(a, "set", "notes", "meta.title", '"Groceries"', check=True)
    sd(a, "edit", "notes", "--text", "body", "--append", "milk and eggs", check=True)
    sd(a, "edit", "notes", "--list", "items", "--push", "milk", check=True)
    sd(a, "edit", "notes", "--counter", "n", "--add", "2", check=True)
    value = json.loads(sd(a, "--json", "show", "notes", "--sync", "0", check=True).stdout)

    file = tmp_path / "notes.json"
    exported = json.loads(sd(a, "export", "notes", str(file), "--json", check=True).stdout)
    assert file.stat().st_mode & 0o777 == 0o600
    data = json.loads(file.read_text())
    assert data["value"] == value and data["name"] == "notes" and data["crdt"] == "loro"
    assert data["id"] == exported["id"] and base64.b64decode(data["snapshot"])
    one_line_error(sd(a, "export", "notes", str(file)), 1, "--force")

    imported = json.loads(sd(b, "--json", "import", str(file), *tickets, check=True).stdout)
    assert imported["name"] == "notes" and imported["id"] != data["id"]
    one_line_error(sd(b, "import", str(file), *tickets), 1, "--name")
    assert json.loads(sd(b, "--json", "show", "notes", "--sync", "0").stdout) == value
    status = sd(b, "--json", "status", "notes", check=True)  # on a quorum of syncnodes
    assert json.loads(status.stdout)[0]["pending"] == 0
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**data, "snapshot": "AAAA"}))
    one_line_error(sd(b, "import", str(broken), *tickets, "--name", "x"), 1, "snapshot")

    # The imported content is synced like any edit: a new device joins and gets it.
    with started(b, "invite", "notes", "--wait", "120", stderr=tmp_path / "invite.err") as inv:
        ticket = first_line(inv).strip()
        joined = sd(c, "--json", "join", "--init", ticket, "--name", "copy", "--timeout", "60")
        assert joined.returncode == 0, joined.stderr
        assert inv.wait(60) == 0
    assert json.loads(sd(c, "--json", "show", "copy", "--sync", "0").stdout) == value

    # join --timeout expiring (the inviter is offline): one line, exit 1, also in JSON.
    ticket = sd(a, "invite", "notes", "--wait", "0", check=True).stdout.strip()
    late = sd(d, "join", "--init", ticket, "--timeout", "2")
    assert late.returncode == 1 and "Traceback" not in late.stderr
    assert late.stderr.strip().splitlines()[-1].startswith("Error: ")
    late = sd(d, "--json", "join", ticket, "--timeout", "2")
    assert late.returncode == 1 and "error" in json.loads(late.stdout)


def test_roles_invite_as_reader_role_and_leave(tmp_path: Path,
                                               nodes: list[NodeProcess]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    sd(a, "init", check=True)
    sd(a, "create", "--name", "notes", *real_syncnodes(nodes), check=True)
    with started(a, "invite", "notes", "--role", "reader", "--wait", "120",
                 stderr=tmp_path / "invite.err") as inv:
        ticket = first_line(inv).strip()
        joined = sd(b, "--json", "join", "--init", ticket, "--timeout", "60")
        assert joined.returncode == 0, joined.stderr
        assert json.loads(joined.stdout)["role"] == "reader"
        assert "as a reader" in joined.stderr
        assert inv.wait(60) == 0
    rows = json.loads(sd(a, "--json", "members", "notes", check=True).stdout)
    assert sorted(r["role"] for r in rows) == ["admin", "reader"]
    b_id = next(r["id"] for r in rows if not r["self"])
    a_id = next(r["id"] for r in rows if r["self"])

    # A reader neither edits nor invites: one line, exit code 4, before any network.
    one_line_error(sd(b, "edit", "notes", "--text", "body", "--append", "x"), 4, "reader")
    one_line_error(sd(b, "invite", "notes", "--wait", "0"), 4, "only an admin can invite")
    one_line_error(sd(b, "role", "notes", b_id, "writer"), 4, "only an admin")
    one_line_error(sd(a, "role", "notes", a_id, "reader"), 4, "last admin")
    one_line_error(sd(a, "leave", "notes"), 4, "last admin")
    one_line_error(sd(b, "compact", "notes"), 4, "readers do not compact")

    done = sd(a, "--json", "role", "notes", b_id, "writer", check=True)
    assert json.loads(done.stdout)["role"] == "writer"
    rows = json.loads(sd(a, "--json", "members", "notes", check=True).stdout)
    assert sorted(r["role"] for r in rows) == ["admin", "writer"]
    human = sd(a, "members", "notes", check=True).stdout
    assert "admin" in human and "writer" in human

    compacted = json.loads(sd(a, "--json", "compact", "notes", check=True).stdout)
    assert compacted["compacted"] is True and compacted["epoch"] >= 3

    left = sd(b, "--json", "leave", "notes", check=True)
    assert json.loads(left.stdout) == {"status": "left"}
    one_line_error(sd(b, "edit", "notes", "--text", "body", "--append", "x"), 1, "left")
