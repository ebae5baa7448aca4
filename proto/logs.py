"""The one place that configures logging (structlog).

JSON lines when stderr is not a terminal (services, CI, log shippers), readable coloured lines on
a terminal. Standard-library ``logging`` records (from libraries) go through the same renderer.

Until something configures structlog (:func:`configure_logging`, or an embedding app's own
``structlog.configure``), the library's loggers hand their events to standard-library
``logging`` (logger names like ``device.document``), never to stdout: an app's stdout is its
own. So the app's logging handlers decide; with none set up, Python prints warnings and errors
on stderr and drops the rest.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

_configured = False


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write, not the stream it was
    when logging was configured (a test harness or an app may swap and close that one; a
    logger holding it then fails with "I/O operation on closed file")."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and stdlib logging for the process.

    ``json=None`` picks JSON when stderr is not a TTY. Safe to call more than once (the last call
    wins), so CLIs can reconfigure after parsing ``--log-level``.
    """
    global _configured
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    use_json = not sys.stderr.isatty() if json is None else json
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    _configured = True


def get_logger(name: str, **bindings: Any) -> Any:
    """A structlog logger bound to a component name (``syncnode.acceptor``...).

    Lazy: modules create their logger at import time, and it must still follow a
    :func:`configure_logging` call made later (level, renderer). While structlog is not
    configured at all, events go to the stdlib logger ``name`` instead (see the module doc)."""
    return _LibraryLogger(name, bindings)


def _plain(_logger: Any, _method: str, event: MutableMapping[str, Any]
           ) -> tuple[tuple[str], dict[str, Any]]:
    """``event key=value ...`` as the stdlib record's message (``exc_info`` stays stdlib's)."""
    text = str(event.pop("event", ""))
    event.pop("component", None)  # the stdlib logger's name says it
    exc_info = event.pop("exc_info", None)
    message = " ".join([text, *(f"{k}={v!r}" for k, v in event.items())])
    return (message,), ({"exc_info": exc_info} if exc_info else {})


class _LibraryLogger:
    """Structlog once it is configured (by us or by the app), stdlib ``logging`` until then."""

    __slots__ = ("_bindings", "_fallback", "_name", "_structlog")

    def __init__(self, name: str, bindings: dict[str, Any]) -> None:
        self._name = name
        self._bindings = bindings
        self._structlog: Any = structlog.get_logger(component=name, **bindings)
        self._fallback: Any = None

    def _target(self) -> Any:
        if structlog.is_configured():
            return self._structlog
        if self._fallback is None:
            self._fallback = structlog.stdlib.BoundLogger(
                logging.getLogger(self._name),
                [structlog.stdlib.filter_by_level, _plain],
                {"component": self._name, **self._bindings})
        return self._fallback

    def bind(self, **bindings: Any) -> _LibraryLogger:
        return _LibraryLogger(self._name, {**self._bindings, **bindings})

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target(), attr)
