"""The default CRDT backend: Loro (notes/crdt.md explains the choice).

Loro's Python binding raises a bare ``BaseException`` on corrupt input; this module is the
boundary where that becomes :class:`proto.crdt.CrdtError` (``KeyboardInterrupt`` and
``SystemExit`` pass through). Remote updates are imported as one batch (orders of magnitude
faster than one by one); if the batch fails, each update is retried alone so one bad update is
rejected without losing the good ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import loro

from proto.crdt import CrdtBackend, CrdtError, PartialChange

BACKEND_ID = "loro/1"
T = TypeVar("T")


def _guard(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise CrdtError(f"{what}: {exc}") from None


class LoroDocument:
    """One Loro document. ``edit`` callbacks get the :class:`Editor` (typed accessors)."""

    backend_id = BACKEND_ID

    def __init__(self, peer_id: int, snapshot: bytes | None = None) -> None:
        self.doc = loro.LoroDoc()  # type: ignore[no-untyped-call]
        if snapshot is not None:
            _guard("snapshot", lambda: self.doc.import_(snapshot))
        self.doc.peer_id = peer_id

    def apply(self, updates: Sequence[bytes]) -> list[CrdtError | None]:
        if not updates:
            return []
        try:
            _guard("update", lambda: self.doc.import_batch(list(updates)))
            return [None] * len(updates)
        except CrdtError:
            pass
        out: list[CrdtError | None] = []
        for u in updates:
            try:
                _guard("update", lambda u=u: self.doc.import_(u))  # type: ignore[misc]
                out.append(None)
            except CrdtError as exc:
                out.append(exc)
        return out

    def change(self, fn: Callable[[Editor], Any]) -> bytes | None:
        before = self.doc.oplog_vv
        try:
            fn(Editor(self.doc))
        except Exception as exc:
            self.doc.commit()
            if self.doc.oplog_vv == before:
                raise
            raise PartialChange(bytes(self.doc.export(loro.ExportMode.Updates(before))),
                                exc) from exc
        self.doc.commit()
        if self.doc.oplog_vv == before:
            return None
        return bytes(self.doc.export(loro.ExportMode.Updates(before)))

    def snapshot(self) -> bytes:
        return bytes(self.doc.export(loro.ExportMode.Snapshot()))

    def version(self) -> bytes:
        return bytes(self.doc.oplog_vv.encode())

    def diff_since(self, version: bytes) -> bytes:
        vv = _guard("version", lambda: loro.VersionVector.decode(version))
        return bytes(self.doc.export(loro.ExportMode.Updates(vv)))

    def value(self) -> Any:
        return self.doc.get_deep_value()

    def version_of(self, updates: Sequence[bytes]) -> bytes:
        # The blob's header only (about 10 us an update): nothing is imported.
        vv = loro.VersionVector()  # type: ignore[no-untyped-call]
        for u in updates:
            meta = _guard("update", lambda u=u: loro.LoroDoc.decode_import_blob_meta(u, False))  # type: ignore[misc]
            vv.merge(meta.partial_end_vv)
        return bytes(vv.encode())

    def combine(self, updates: Sequence[bytes]) -> bytes | None:
        if len(updates) < 2:
            return None
        peer = self.doc.peer_id
        start = end = None
        for u in updates:  # each must continue the previous one, with our operations only
            try:
                meta = loro.LoroDoc.decode_import_blob_meta(u, False)
            except Exception:
                return None
            spans = meta.partial_end_vv.to_spans().inner()
            first = meta.partial_start_vv.get_last(peer)
            first = 0 if first is None else first + 1
            last = meta.partial_end_vv.get_last(peer)
            if set(spans) != {peer} or last is None or (end is not None and first != end):
                return None
            start = first if start is None else start
            end = last + 1
        if start is None or end is None or end > (self.doc.oplog_vv.get_last(peer) or 0) + 1:
            return None
        span = loro.IdSpan(peer, loro.CounterSpan(start, end))
        return bytes(self.doc.export(loro.ExportMode.UpdatesInRange([span])))

    def version_includes(self, big: bytes, small: bytes) -> bool:
        a = _guard("version", lambda: loro.VersionVector.decode(big))
        b = _guard("version", lambda: loro.VersionVector.decode(small))
        return bool(a.includes_vv(b))


class Editor:
    """Typed accessors handed to ``doc.change(fn)``: root containers by name.

    ``text(name)``, ``map(name)``, ``list(name)`` and ``counter(name)`` return Loro containers
    (``insert``/``delete`` for text and lists, ``insert(key, value)`` for maps,
    ``increment(n)`` for counters; see the Loro documentation). Text indices are code points.
    """

    def __init__(self, doc: loro.LoroDoc) -> None:
        self._doc = doc

    def _check(self, name: str, kind: str) -> None:
        """A root name holds one kind of container: Loro keeps a text and a map of the same
        name apart, and the document's value then shows only one of them, so an edit of the
        other would be saved and sent but never seen (``set notes body.x 1`` on a text
        ``body`` hid the text)."""
        roots = self._doc.get_value()
        existing = roots.get(name) if isinstance(roots, dict) else None
        found = getattr(existing, "container_type", None)
        if found is not None and str(found) != kind:
            raise CrdtError(f"{name!r} is a {str(found).lower()} in this document, not a "
                            f"{kind.lower()}; use another name")

    def text(self, name: str) -> loro.LoroText:
        self._check(name, "Text")
        return self._doc.get_text(name)

    def map(self, name: str) -> loro.LoroMap:
        self._check(name, "Map")
        return self._doc.get_map(name)

    def list(self, name: str) -> loro.LoroList:
        self._check(name, "List")
        return self._doc.get_list(name)

    def counter(self, name: str) -> loro.LoroCounter:
        self._check(name, "Counter")
        return self._doc.get_counter(name)

    def merge(self, snapshot: bytes) -> None:
        """Merge another document's snapshot (e.g. an exported file) into this one as part of
        this local change: it is then saved and sent like any edit. Raises on a malformed
        snapshot before anything changes."""
        self._doc.import_(snapshot)


BACKENDS: dict[str, Callable[[int, bytes | None], CrdtBackend]] = {"loro": LoroDocument}
"""Backends by the ``crdt`` name recorded in the manifest: ``factory(peer_id, snapshot)``."""
