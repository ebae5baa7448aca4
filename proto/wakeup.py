"""A broadcast wake-up for trio tasks waiting on shared state."""

from __future__ import annotations

import trio


class Signal:
    """Every task waiting when :meth:`fire` runs wakes up; later waiters wait for the next
    fire. Waiters re-check their condition after waking (a fire says "something changed")."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()
