"""``syncnode selfcheck``: check the parts of the installed stack a syncnode uses.

A syncnode decodes and verifies signed frames, stores them in SQLite and speaks iroh; it never
decrypts (no MLS) and never holds a document (no CRDT), so it checks exactly the shared stack
checks of :mod:`proto.selfcheck`, and a machine that only runs syncnodes does not fail on a
device binding it never loads. ``syncdevice selfcheck`` (:mod:`device.selfcheck`) adds those.
"""

from __future__ import annotations

from collections.abc import Callable

from proto.selfcheck import STACK_CHECKS, Check
from proto.selfcheck import run as run_checks

CHECKS: tuple[Check, ...] = STACK_CHECKS


def run(echo: Callable[[str], None] = print) -> bool:
    """Run every check, report each, return True if all passed."""
    return run_checks(CHECKS, echo)
