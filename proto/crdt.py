"""The CRDT backend interface the device engine talks to (DESIGN.md "Application messages").

The engine never looks inside CRDT updates: it moves opaque update bytes between devices,
encrypted, and hands them to a backend. What the engine needs from a backend is small:
apply remote updates (idempotent, any order, in batches), take the updates made locally,
snapshot/load, and a version with a diff since a version (for state transfer and
anti-entropy). Anything a member sends is untrusted input for the backend: a malformed update
must raise :class:`CrdtError` and leave the document untouched.

``backend_id`` (for example ``"loro/1"``) travels in every payload and snapshot, so documents of
different backends are never mixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from proto.errors import SyncnodeError


class CrdtError(SyncnodeError):
    """An update or snapshot was rejected by the backend; the document is unchanged."""


class PartialChange(Exception):
    """``fn`` of :meth:`CrdtBackend.change` raised after it had already changed the document
    (a CRDT cannot roll back). ``update`` holds what it did change, so the caller can store and
    send it, keeping the saved state equal to the state in memory; ``error`` is what ``fn``
    raised."""

    def __init__(self, update: bytes, error: BaseException) -> None:
        super().__init__(str(error))
        self.update = update
        self.error = error


class CrdtBackend(Protocol):
    backend_id: str

    def apply(self, updates: Sequence[bytes]) -> list[CrdtError | None]:
        """Import remote updates as one batch. Returns, per update, ``None`` if it was
        applied or the :class:`CrdtError` it was rejected with (the others still apply)."""
        ...

    def change(self, fn: Any) -> bytes | None:
        """Run ``fn`` on the document as one local transaction; return its update (``None``
        if it changed nothing). If ``fn`` raises, that exception comes out as is when nothing
        changed, else wrapped in :class:`PartialChange` with the update of what did."""
        ...

    def snapshot(self) -> bytes: ...

    def version(self) -> bytes:
        """An encoded version (state vector) of everything this document contains."""
        ...

    def diff_since(self, version: bytes) -> bytes:
        """One update with everything this document has beyond ``version``.
        Raises :class:`CrdtError` if ``version`` is malformed."""
        ...

    def value(self) -> Any:
        """The whole document as plain Python values (dicts, lists, str, numbers)."""
        ...

    def version_of(self, updates: Sequence[bytes]) -> bytes:
        """The smallest version that contains every operation of ``updates`` (updates or a
        snapshot), without applying them: what a compaction check compares
        (:mod:`device.compaction_check`). Raises :class:`CrdtError` if one is malformed."""
        ...

    def combine(self, updates: Sequence[bytes]) -> bytes | None:
        """One update holding exactly the operations of ``updates``, this document's own
        consecutive local edits in order; ``None`` when they are not that (or there is one
        only), and the caller sends them as they are. A receiver imports one update instead of
        many (a sender's flush holds every edit made while the previous one was in flight:
        twenty tiny updates import six times slower than one that holds them all)."""
        ...

    def version_includes(self, big: bytes, small: bytes) -> bool:
        """Whether version ``big`` contains everything version ``small`` does. Raises
        :class:`CrdtError` if either is malformed."""
        ...
