"""``syncnode selfcheck`` and ``syncdevice selfcheck``: the runner, each check, both commands, and
the rule that put the shared checks in proto/ (syncnode/ and device/ never import each other)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device import selfcheck as device_selfcheck
from proto import selfcheck
from syncnode import selfcheck as syncnode_selfcheck

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SYNCDEVICE_")}


def test_runner_reports_every_check_and_fails_if_one_fails() -> None:
    def broken() -> str:
        raise ValueError("no such binding")

    async def later() -> str:  # async checks run under their own trio.run
        return "async fine"

    lines: list[str] = []
    ok = selfcheck.run([("first", lambda: "fine"), ("second", broken), ("third", later)],
                       lines.append)
    assert not ok
    assert lines[0].startswith("  ok    first: fine (")
    assert lines[1] == "  FAIL  second: ValueError: no such binding"
    assert lines[2].startswith("  ok    third: async fine (")
    assert selfcheck.run([("only", lambda: "fine")], lines.append)


@pytest.mark.parametrize("check", [selfcheck.check_wire, selfcheck.check_sqlite,
                                   device_selfcheck.check_mls, device_selfcheck.check_crdt],
                         ids=lambda f: f.__name__)
def test_each_in_process_check_passes(check: selfcheck.CheckFn) -> None:
    detail = check()
    assert isinstance(detail, str) and detail


def test_what_each_program_checks() -> None:
    """A syncnode checks only the shared stack (it loads no MLS or CRDT binding); a device
    checks its two bindings first, then the same shared stack."""
    assert syncnode_selfcheck.CHECKS == selfcheck.STACK_CHECKS
    names = [name for name, _ in device_selfcheck.CHECKS]
    assert names[:2] == ["mls (mls-rs via agentvault-mls-rs-uniffi)", "crdt (loro)"]
    assert device_selfcheck.CHECKS[2:] == selfcheck.STACK_CHECKS


@pytest.mark.parametrize("prog", ["syncnode", "syncdevice"])
def test_selfcheck_command(prog: str) -> None:
    done = subprocess.run([str(BIN / prog), "selfcheck"], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert done.returncode == 0, (done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    checks = (syncnode_selfcheck if prog == "syncnode" else device_selfcheck).CHECKS
    assert lines[0] == f"{prog} selfcheck" and lines[-1] == "all checks passed"
    assert [ln.split(":")[0] for ln in lines[1:-1]] == [f"  ok    {n}" for n, _ in checks]


def test_syncdevice_selfcheck_json() -> None:
    done = subprocess.run([str(BIN / "syncdevice"), "--json", "selfcheck"], capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ok": True}
    assert "  ok    iroh transport" in done.stderr  # the report goes to stderr with --json


def test_syncnode_and_device_never_import_each_other() -> None:
    for package, other in (("syncnode", "device"), ("device", "syncnode")):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                crossing = [n for n in names if n.split(".")[0] == other]
                assert not crossing, f"{path.relative_to(ROOT)} imports {crossing}"
