"""``syncdevice selfcheck``: check that this machine can run a device.

A device needs everything a syncnode needs (the shared checks of :mod:`proto.selfcheck`: codec
and signatures, SQLite, iroh) and the two bindings only devices load: MLS, through which every
message is encrypted, and the CRDT backend that holds the documents. Those two are checked
first, through the device's own wrappers (:mod:`device.mls`, :mod:`device.crdt_loro`), so the
check covers the code paths a device takes, not just that the libraries import.
"""

from __future__ import annotations

from collections.abc import Callable

from proto.selfcheck import STACK_CHECKS, Check
from proto.selfcheck import run as run_checks


def check_mls() -> str:
    from device import mls

    msg = b"hello from the selfcheck"
    got = mls.selfcheck(msg)
    if got != msg:
        raise RuntimeError(f"MLS round trip returned {got!r}")
    return "two-member group, 1 encrypted message decrypted"


def check_crdt() -> str:
    """Two replicas edit concurrently, exchange their updates and converge; a corrupt update is
    refused as a CrdtError (the backend's boundary), leaving the document as it was."""
    from device.crdt_loro import BACKEND_ID, LoroDocument
    from proto.crdt import CrdtError

    a, b = LoroDocument(1), LoroDocument(2)
    ua = a.change(lambda e: e.text("t").insert(0, "hello "))
    ub = b.change(lambda e: e.text("t").insert(0, "world"))
    if ua is None or ub is None:
        raise RuntimeError("an edit produced no update")
    if a.apply([ub]) != [None] or b.apply([ua]) != [None]:
        raise RuntimeError("an update was refused")
    if a.value() != b.value():
        raise RuntimeError(f"replicas diverged: {a.value()!r} != {b.value()!r}")
    before = b.value()
    refused = b.apply([ua[:-3]])
    if not isinstance(refused[0], CrdtError) or b.value() != before:
        raise RuntimeError("a corrupt update was not refused cleanly")
    return f"{BACKEND_ID}: 2 replicas converged on {a.value()['t']!r}; a corrupt update refused"


CHECKS: tuple[Check, ...] = (
    ("mls (mls-rs via agentvault-mls-rs-uniffi)", check_mls),
    ("crdt (loro)", check_crdt),
    *STACK_CHECKS,
)


def run(echo: Callable[[str], None] = print) -> bool:
    """Run every check, report each, return True if all passed."""
    return run_checks(CHECKS, echo)
