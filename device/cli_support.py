"""The machinery every ``syncdevice`` command shares (commands are in :mod:`device.cli`).

* :func:`run_device` opens the device and runs one command's coroutine under trio. Project
  errors (:class:`proto.errors.SyncnodeError` and subclasses, ``CrdtError`` among them, and
  ``trio.TooSlowError``) become one line and exit code 1 (4 for
  :class:`device.errors.NotAllowed`: the device's role does not permit it); Ctrl-C stops
  cleanly with exit code 130 (trio may deliver it wrapped in exception groups); only genuine
  bugs show a traceback.
* :func:`main` renders every error as one line, ``Error: ...`` on stderr, and with ``--json``
  also ``{"error": ..., "code": N}`` as the only thing on stdout.
* :func:`progress` shows a spinner on stderr while slow work runs, on a terminal only.
* Every command except ``init`` (and ``join --init``) refuses a ``--home`` with no device in it,
  instead of silently creating a new identity there.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import trio

OK, ERROR, USAGE, PENDING, NOT_ALLOWED, INTERRUPTED = 0, 1, 2, 3, 4, 130

EXIT_CODES = ("\b\nExit codes:\n"
              "  0    ok\n"
              "  1    error: one line on stderr says what (with --json, also\n"
              "       {\"error\": ..., \"code\": 1} on stdout)\n"
              "  2    usage error: unknown command or option, invalid value\n"
              "  3    pending: status found updates not yet stored by a quorum of\n"
              "       syncnodes; create could not yet register the document with a quorum\n"
              "  4    not allowed: this device's role in the document does not permit it\n"
              "       (only admins invite, remove and change roles; readers do not edit\n"
              "       or compact)\n"
              "  5    does not verify: the evidence given to verify-evidence proves nothing\n"
              "       (forged, tampered, or no contradiction)\n"
              "  130  interrupted (Ctrl-C)")


class CliError(click.ClickException):
    """A user-facing failure: one line, exit code 1."""


class NotAllowedError(CliError):
    """The device's role does not permit the command: one line, exit code 4."""

    exit_code = NOT_ALLOWED


class Interrupted(Exception):
    """Ctrl-C: stop quietly with exit code 130."""


class Ctx:
    """What the group's options say, shared by every command."""

    current: Ctx | None = None
    """The Ctx of this invocation (read by :func:`main` to render errors)."""

    def __init__(self, home: Path, as_json: bool, listen: str, relays: tuple[str, ...]) -> None:
        self.home = home
        self.json = as_json
        self.listen = listen
        self.relays = relays
        Ctx.current = self

    def out(self, human: str, data: Any) -> None:
        if self.json:
            click.echo(json.dumps(data, sort_keys=True, default=str))
        else:
            click.echo(human)


pass_ctx = click.make_pass_decorator(Ctx)


WAIT = click.option("--wait", default=15.0, show_default=True,
                    help="Seconds to wait for syncnodes to acknowledge (0: do not wait).")


async def send_pending(doc: Any, deadline: float) -> None:
    """Seal the pending edits once this run caught up with the decisions it missed, then wait
    until a quorum stored them; both by ``deadline`` (trio time; offline, they are sealed when
    it passes). A one-shot command that sealed at once sent them in the epoch the device last
    saw, which members added since cannot read (they had to ask a member online for the whole
    state; found by test_create_members_of_and_members_pick_it_up)."""
    with trio.move_on_at(deadline):
        await doc.wait_caught_up()
    doc.flush()
    with trio.move_on_at(deadline):
        await doc.wait_durable()


async def settle(doc: Any, wait: float) -> None:
    """Send pending edits and wait up to ``wait`` s in all until a quorum stored them
    (:func:`send_pending`); say so if some are still pending then."""
    await send_pending(doc, trio.current_time() + wait)
    s = doc.sync_status()
    if s.unsent or s.outbox:
        click.echo(f"saved locally; {s.unsent + s.outbox} update(s) not yet stored by a quorum "
                   f"of syncnodes ({len(s.connected)}/{s.syncnodes} reachable); they are sent "
                   "the next time syncdevice runs", err=True)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    obj = ctx.find_object(Ctx)
    if value and obj is not None:
        obj.json = True


JSON_OPTION = click.option("--json", "json_flag", is_flag=True, expose_value=False,
                           is_eager=True, callback=_set_json,
                           help="Machine-readable JSON on stdout (also before the command).")


def check_listen(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """``--listen`` is IPv4:PORT or [IPv6]:PORT (what the iroh binding accepts)."""
    host, sep, port = value.rpartition(":")
    try:
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError
        if host.startswith("[") and host.endswith("]"):
            ipaddress.IPv6Address(host[1:-1])
        else:
            ipaddress.IPv4Address(host)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not IP:PORT (port 0-65535), e.g. 0.0.0.0:0 "
                                 "or [::]:7700") from None
    return value


def check_relays(_ctx: click.Context, _param: click.Parameter,
                 value: tuple[str, ...]) -> tuple[str, ...]:
    """``--relay`` is an http(s) URL (the binding panics on anything else)."""
    for url in value:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.BadParameter(f"{url!r} is not an http(s) URL, e.g. "
                                     "https://relay.example.org")
    return value


def has_device(home: Path) -> bool:
    return (home / "device.db").is_file()


def require_device(ctx: Ctx, *, hint: str = "") -> None:
    if not has_device(ctx.home):
        raise CliError(f"no device in {ctx.home}: create one with `syncdevice init --home "
                       f"{ctx.home}`{hint}, or pass the --home of an existing device")


def _expected() -> tuple[type[BaseException], ...]:
    from proto.errors import SyncnodeError

    return SyncnodeError, trio.TooSlowError, click.ClickException


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _as_cli_error(exc: BaseException) -> click.ClickException:
    from device.errors import NotAllowed

    if isinstance(exc, click.ClickException):
        return exc
    if isinstance(exc, NotAllowed):
        return NotAllowedError(str(exc))
    if isinstance(exc, trio.TooSlowError):
        current = click.get_current_context(silent=True)
        params = current.params if current is not None else {}
        after = f" after {params['timeout']:g} s (--timeout)" if "timeout" in params else ""
        return CliError(f"timed out{after}")
    return CliError(str(exc) or type(exc).__name__)


def run_device(ctx: Ctx, fn: Callable[[Any], Awaitable[int | None]], *,
               create: bool = False, join_offers: bool = False) -> None:
    """Open the device (``create``: also a new one), run ``fn(device)`` under trio (its result
    is the exit code) and close the store; see the module doc for errors and Ctrl-C.
    ``join_offers``: join documents offered through a group (long-running commands only:
    :attr:`device.config.DeviceConfig.join_offers`)."""
    from device.agent import Device, DeviceConfig

    if not create:
        require_device(ctx)
    expected = _expected()
    failure: list[BaseException] = []
    config = DeviceConfig(listen=ctx.listen, relays=ctx.relays, join_offers=join_offers)

    async def main() -> int | None:
        try:
            async with Device.open(ctx.home, config=config) as device:
                try:
                    return await fn(device)
                except expected as exc:  # here, before the device's nursery wraps it
                    failure.append(exc)
                    return ERROR
        except expected as exc:
            failure.append(exc)
            return ERROR

    try:
        code = trio.run(main)
    except KeyboardInterrupt:
        raise Interrupted() from None
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if not all(isinstance(e, (KeyboardInterrupt, *expected)) for e in leaves):
            raise  # a bug: the traceback is wanted
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            raise Interrupted() from None
        raise _as_cli_error(leaves[0]) from None
    if failure:
        raise _as_cli_error(failure[0]) from None
    if code:
        sys.exit(code)


class Status:
    """What :func:`progress` yields: ``update`` changes the spinner's text (a no-op without a
    spinner), ``say`` prints a line that stays, on stderr (also when piped)."""

    def __init__(self, spinner: Any = None, console: Any = None) -> None:
        self._spinner = spinner
        self._console = console

    def update(self, text: str) -> None:
        if self._spinner is not None:
            self._spinner.update(text)

    def say(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, markup=False, highlight=False)
        else:
            click.echo(text, err=True)


@contextmanager
def progress(ctx: Ctx, text: str) -> Iterator[Status]:
    """A spinner with ``text`` on stderr while the block runs, when stderr is a terminal and
    the output is not ``--json``; nothing at all otherwise (piped, scripts, CI)."""
    if ctx.json or not sys.stderr.isatty():
        yield Status()
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(text) as spinner:
        yield Status(spinner, console)


def _json_wanted(args: list[str]) -> bool:
    if Ctx.current is not None and Ctx.current.json:
        return True
    return "--json" in (args[:args.index("--")] if "--" in args else args)


def main(cli: click.Group, args: list[str] | None = None) -> None:
    """Run ``cli`` and render its errors (see the module doc); exits with the exit code."""
    argv = list(sys.argv[1:] if args is None else args)
    Ctx.current = None
    try:
        try:
            code = cli.main(args=argv, prog_name="syncdevice", standalone_mode=False)
        except _expected() as exc:  # a project error outside run_device
            raise _as_cli_error(exc) from None
    except (click.exceptions.Abort, Interrupted):  # click turns an early Ctrl-C into Abort
        sys.exit(INTERRUPTED)
    except click.ClickException as exc:
        message = exc.format_message()
        if _json_wanted(argv):
            click.echo(json.dumps({"error": message, "code": exc.exit_code}))
        if isinstance(exc, click.UsageError) and exc.ctx is not None:  # one line, with a hint
            message += f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"Error: {message}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else OK)
