"""The README's walkthrough as a newcomer runs it: real ``syncnode run`` processes and the real
``syncdevice`` console script, each command a separate process, two device homes.

Invite/join gives the document (and the joiner can ``show`` it by the inviter's name); a spent
ticket is refused within seconds; ``--ttl`` must be positive; ``create`` refuses a syncnode named
twice and says plainly when no quorum registered the document; a removed device's ``status``
shows the ``removed`` alarm. Every wait is bounded; only processes started here are stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from syncnode.procs import NodeProcess
from tests.cli_kit import (
    first_line,
    one_line_error,
    real_syncnodes,
    sd,
    started,
    unreachable_syncnodes,
)
from tests.syncnode_kit import restart_on_new_port


def test_invite_and_join_as_the_readme_says(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sd(a, "init", check=True)
    sd(a, "create", *real_syncnodes(nodes), "--name", "notes", check=True)
    sd(a, "set", "notes", "meta.title", '"Groceries"', check=True)
    sd(a, "edit", "notes", "--text", "body", "--append", "hello", check=True)

    with started(a, "invite", "notes", stderr=tmp_path / "invite.err") as inviter:
        ticket = first_line(inviter).strip()
        assert ticket.startswith("sninv1")
        joined = sd(b, "join", "--init", ticket)
        assert joined.returncode == 0, joined.stderr
        assert "joined notes" in joined.stdout
        assert "received the document" in joined.stderr  # it said what it waited for
        assert inviter.wait(60) == 0  # the inviter stays until the new device has it
    said = (tmp_path / "invite.err").read_text()
    assert "waiting for the new device" in said and "added" in said, said
    # The joiner has the content at once, under the inviter's name for the document.
    shown = json.loads(sd(b, "--json", "show", "notes", "--sync", "0", check=True).stdout)
    assert shown == {"meta": {"title": "Groceries"}, "body": "hello"}

    # The spent ticket, tried by a third device while the inviter runs: refused in seconds.
    with started(a, "watch", "notes", stderr=tmp_path / "watch.err") as watcher:
        first_line(watcher)  # the watcher is online (its links read the mailbox)
        began = time.monotonic()
        again = sd(c, "join", "--init", ticket, "--timeout", "120")
        assert again.returncode == 1 and "Traceback" not in again.stderr
        last = again.stderr.strip().splitlines()[-1]  # after the progress lines
        assert last.startswith("Error: the inviter refused") and "already used" in last
        assert time.monotonic() - began < 60  # well before the 120 s timeout
        watcher.terminate()
        watcher.wait(30)

    # Lifetimes must be positive.
    for ttl in ("0", "-5"):
        bad = sd(a, "invite", "notes", "--ttl", ttl, "--wait", "0")
        assert bad.returncode == 2 and "--ttl" in bad.stderr, bad.stderr

    # Removing b: b's status shows the alarm (it used to be silent).
    b_id = json.loads(sd(b, "--json", "init", check=True).stdout)["device"][:10]
    sd(a, "remove", "notes", b_id, check=True)
    status = sd(b, "--json", "status", "notes", "--wait", "5")
    rows = json.loads(status.stdout)
    assert rows[0]["status"] == "removed" and "removed" in rows[0]["alarms"], rows
    assert "ALARMS: removed" in sd(b, "status", "notes", "--wait", "5").stdout


def test_create_refuses_duplicates_and_says_when_it_is_local(tmp_path: Path,
                                                             nodes: list[NodeProcess]) -> None:
    home = tmp_path / "a"
    sd(home, "init", check=True)
    ticket = str(nodes[0].ticket)
    one_line_error(sd(home, "create", "--syncnode", ticket, "--syncnode", ticket,
                      "--syncnode", str(nodes[1].ticket)), 1, "named more than once")
    assert json.loads(sd(home, "--json", "list", check=True).stdout) == []
    # Only unreachable syncnodes: created locally, said so plainly, exit code 3.
    local = sd(home, "create", "--name", "offline", "--wait", "3", *unreachable_syncnodes())
    assert local.returncode == 3, local.stderr
    assert "created offline" in local.stdout
    assert "the document is local for now" in local.stderr
    # A name already used here is refused (documents are addressed by name).
    one_line_error(sd(home, "create", "--name", "offline", "--wait", "0",
                      *unreachable_syncnodes()), 1, "exists already")


def test_a_moved_syncnode_is_set_by_hand(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    """A document on one syncnode, which moves: no other syncnode can relay its new address
    record, so the user sets the new ticket by hand."""
    home = tmp_path / "a"
    sd(home, "init", check=True)
    moved = nodes[2]
    sd(home, "create", "--name", "notes", "--syncnode", str(moved.ticket), check=True)
    restart_on_new_port(moved)
    before = json.loads(sd(home, "--json", "status", "notes", "--wait", "3").stdout)
    assert before[0]["connected"] == 0  # the address in the document is stale
    done = json.loads(sd(home, "--json", "set-address", str(moved.ticket), check=True).stdout)
    assert done == [{"name": "notes", "connected": 1, "syncnodes": 1}]
    after = json.loads(sd(home, "--json", "status", "notes", "--wait", "5").stdout)
    assert after[0]["connected"] == 1  # remembered by the device
    one_line_error(sd(home, "set-address", "sn1nonsense"), 1, "bad syncnode ticket")
