"""Exception groups at the edge of a context manager that hides a nursery.

Trio wraps whatever the body of a nursery raises in an ExceptionGroup. When the nursery belongs
to a context manager (a connection with its reader task), that is an implementation detail: the
caller's ``except TransportError`` must keep working, so a group of one comes out as itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def single_errors() -> Iterator[None]:
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
