"""``syncdevice create --members-of DOC`` with real syncnode processes and console scripts: the
members' devices pick the new document up while they run ``watch``; a non-admin is refused."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from syncnode.procs import NodeProcess
from tests.cli_kit import first_line, one_line_error, real_syncnodes, sd, started

_unread: dict[int, bytes] = {}
"""Output of a watch process read but not yet consumed, by pid."""


def next_event(proc: subprocess.Popen[str], kind: str, timeout: float = 60) -> dict[str, Any]:
    """The next ``--json`` line of ``watch`` whose event is ``kind`` (others are skipped).
    Reads the pipe itself: two lines arriving together must not hide in a file buffer that
    ``select`` cannot see."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = _unread.pop(proc.pid, b"")
    deadline = time.monotonic() + timeout
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            event: dict[str, Any] = json.loads(line)
            if event["event"] == kind:
                _unread[proc.pid] = buf
                return event
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"no {kind} event within {timeout} s")
        chunk = os.read(fd, 65536)
        assert chunk, f"watch exited ({proc.poll()}) before a {kind} event"
        buf += chunk


def add_member(tmp_path: Path, inviter: Path, home: Path, doc: str) -> None:
    with started(inviter, "invite", doc, "--wait", "120",
                 stderr=tmp_path / f"invite-{home.name}.err") as inv:
        ticket = first_line(inv).strip()
        sd(home, "join", "--init", ticket, "--timeout", "60", check=True)
        assert inv.wait(60) == 0


def roles(home: Path, doc: str) -> dict[str, str]:
    rows = json.loads(sd(home, "--json", "members", doc, check=True).stdout)
    return {r["fingerprint"]: r["role"] for r in rows}


def test_create_members_of_and_members_pick_it_up(tmp_path: Path,
                                                  nodes: list[NodeProcess]) -> None:
    a, b, c = (tmp_path / x for x in "abc")
    sd(a, "init", check=True)
    sd(a, "create", "--name", "team", *real_syncnodes(nodes), check=True)
    add_member(tmp_path, a, b, "team")
    add_member(tmp_path, a, c, "team")

    one_line_error(sd(b, "create", "--members-of", "team", "--name", "mine"), 1,
                   "only an admin of team")
    usage = sd(a, "create", "--name", "nowhere")
    assert usage.returncode == 2 and "--members-of" in usage.stderr, usage.stderr

    b_id, c_id = (json.loads(sd(h, "--json", "init").stdout)["device"][:10] for h in (b, c))
    # b runs `watch` (it joins offers); c is not running at all.
    with started(b, "--json", "watch", "team", stderr=tmp_path / "watch-b.err") as watch_b:
        assert json.loads(first_line(watch_b))["event"] == "value"
        created = sd(a, "--json", "create", "--members-of", "team", "--name", "plan",
                     "--wait", "10")
        assert created.returncode == 0, created.stderr
        out = json.loads(created.stdout)
        assert out["joined"] == [b_id] and out["waiting"] == [c_id], out
        assert not out["offer_pending"]
        assert f"({c_id}) join when their device runs" in created.stderr
        event = next_event(watch_b, "new-document")
        assert event["id"] == out["id"] and event["name"] == "plan"
        watch_b.send_signal(signal.SIGINT)
        assert watch_b.wait(30) == 130

    # c picks it up later, while it runs `watch` and so does a (the inviter admits it).
    with started(a, "--json", "watch", "plan", stderr=tmp_path / "watch-a.err") as watch_a, \
            started(c, "--json", "watch", "team", stderr=tmp_path / "watch-c.err") as watch_c:
        event = next_event(watch_c, "new-document")
        assert event["id"] == out["id"]
        for proc in (watch_c, watch_a):
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 130

    sd(b, "edit", "plan", "--list", "items", "--push", "from b", check=True)
    sd(c, "edit", "plan", "--list", "items", "--push", "from c", check=True)
    for home in (a, b, c):  # each learns the others' adds and edits
        shown = json.loads(sd(home, "--json", "show", "plan", "--sync", "3", check=True).stdout)
        assert sorted(shown["items"]) == ["from b", "from c"], home.name
    assert roles(a, "plan") == roles(b, "plan") == roles(c, "plan") == roles(a, "team")
    team = list(roles(a, "team").values())  # an admin and two of the default role, copied
    assert team.count("admin") == 1 and len(set(team)) == 2
    assert "items" not in json.loads(sd(a, "--json", "show", "team", "--sync", "0").stdout)
