"""The one place protocol code gets randomness and wall-clock time from.

In production both come from the operating system: keys, group ids and invite secrets from the
CSPRNG (:mod:`secrets`), wall time from :func:`time.time`. The deterministic simulator
(``simulations/``) replaces them for the duration of a run with :func:`simulated`: a seeded
generator, so a seed replays a run bit for bit, and per-task wall clocks derived from trio's
mock clock, so it can make one machine's clock jump. A seeded source is for simulation only;
nothing outside ``simulations/`` and tests calls :func:`simulated`.

Wall time is a context variable, so each simulated node (whose tasks inherit the context of the
task that started it) can have its own clock.
"""

from __future__ import annotations

import contextvars
import random
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_source: random.Random | None = None
_wall: contextvars.ContextVar[Callable[[], float]] = contextvars.ContextVar(
    "syncnode_wall_clock", default=time.time)


def token_bytes(n: int) -> bytes:
    """``n`` random bytes (secret material: keys, group ids, invite secrets, nonces)."""
    return secrets.token_bytes(n) if _source is None else _source.randbytes(n)


def randbits(k: int) -> int:
    return secrets.randbits(k) if _source is None else _source.getrandbits(k)


def uniform(a: float, b: float) -> float:
    """Jitter (backoff, answer spreading); not secret."""
    return random.uniform(a, b) if _source is None else _source.uniform(a, b)


def rng() -> random.Random:
    """A generator for a sequence of non-secret choices (one proposer's backoff)."""
    return random.Random(randbits(64))


def wall() -> float:
    """Wall-clock seconds since the epoch, as this task's machine sees them (expiry times)."""
    return _wall.get()()


def set_wall_clock(clock: Callable[[], float]) -> contextvars.Token[Callable[[], float]]:
    """Use ``clock`` as the wall clock of this task and the tasks it starts from now on."""
    return _wall.set(clock)


@contextmanager
def wall_clock(clock: Callable[[], float]) -> Iterator[None]:
    """Use ``clock`` as this task's wall clock inside the block (the simulator acts on a
    device's behalf with that device's clock)."""
    token = _wall.set(clock)
    try:
        yield
    finally:
        _wall.reset(token)


@contextmanager
def simulated(seed: int) -> Iterator[random.Random]:
    """Draw all randomness from a generator seeded with ``seed`` (simulation only)."""
    global _source
    previous, _source = _source, random.Random(seed)
    try:
        yield _source
    finally:
        _source = previous
