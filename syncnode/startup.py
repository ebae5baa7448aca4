"""What ``syncnode run`` checks and claims before it serves anything.

* **Addresses are validated first** (``--listen``, ``--http`` or the same keys in
  ``syncnode.toml``), so a typo creates nothing and prints one line, not a traceback from the
  native binding.
* **The data dir must be initialised**: without a node key ``run`` refuses (``syncnode init``, or
  ``run --init`` for scripts, create it). Silently creating a key would give an operator whose
  volume was not mounted a brand-new identity that no document names.
* **One daemon per data dir**: an exclusive :func:`fcntl.flock` on ``syncnode.lock``, held until
  the daemon stops. Two processes with one key and one database would be two Paxos acceptors
  answering as one identity. The kernel drops the lock when the process dies, also on SIGKILL,
  so there is never a stale lock to clean up. The file keeps the holder's pid for the message.
* **Addresses survive restarts**: with port 0 the node reuses the port of its previous run
  (``listen-port`` in the data dir) when it is free, so the tickets devices hold stay valid; see
  :func:`advertised` for why the ticket holds only the address family of ``listen``.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import trio

from proto.errors import SyncnodeError, TransportError
from proto.identity import SecretKey, read_key_file, write_key_file
from proto.logs import get_logger
from proto.ticket import same_family
from proto.transport.iroh import IrohTransport
from syncnode.config import CONFIG_NAME, DEFAULT_TOML, KEY_NAME, Config

log = get_logger("syncnode.startup")

LOCK_NAME = "syncnode.lock"
PORT_NAME = "listen-port"
LISTEN_HINT = "use IP:PORT, e.g. 0.0.0.0:7600, 127.0.0.1:0 (0: any free port) or [::]:7600"


class StartupError(SyncnodeError):
    """A problem the operator can fix. The message is one line: what is wrong, what to do."""


def _port(text: str, what: str, value: str, hint: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise StartupError(f"{what} {value!r}: the port must be 0-65535 (0: any free port); "
                           f"{hint}")
    return int(text)


def parse_listen(value: str, what: str = "--listen") -> tuple[str, int]:
    """``(host, port)`` of an iroh listen address; IPv6 hosts keep their brackets."""
    host, sep, port = value.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        raise StartupError(f"{what} {value!r} is not IP:PORT; {LISTEN_HINT}") from None
    if (ip.version == 6) != (bare != host) or not sep:
        raise StartupError(f"{what} {value!r}: write IPv6 addresses in brackets and IPv4 "
                           f"without; {LISTEN_HINT}")
    return host, _port(port, what, value, LISTEN_HINT)


def parse_http(value: str, what: str = "--http") -> tuple[str, int]:
    """``(host, port)`` of the HTTP listen address (host names allowed, brackets removed)."""
    host, sep, port = value.rpartition(":")
    hint = "use HOST:PORT, e.g. 127.0.0.1:7601 or 127.0.0.1:0 (0: any free port)"
    if not sep or not host.strip("[]"):
        raise StartupError(f"{what} {value!r} is not HOST:PORT; {hint}")
    return host.strip("[]"), _port(port, what, value, hint)


def init_data_dir(data_dir: Path, key: SecretKey | None = None) -> SecretKey:
    """Create the data dir (0700), a node key (0600; new unless ``key`` is given: another
    process of the same node) and the commented config file."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = key or SecretKey.generate()
    write_key_file(data_dir / KEY_NAME, key)  # fails, changing nothing, if a key exists
    config_path = data_dir / CONFIG_NAME
    if not config_path.exists():
        config_path.write_text(DEFAULT_TOML, encoding="utf-8")
    return key


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir's exclusive lock; returns the file descriptor that holds it (closing
    it, or the process ending, releases it)."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(f"cannot lock {path}: {exc.strerror}") from None
        raise StartupError(f"another syncnode (pid {holder}) is already running with data dir "
                           f"{data_dir}; stop it first, or use another --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def claim_data_dir(data_dir: Path, *, init: bool, echo: Callable[[str], None]
                   ) -> tuple[SecretKey, int]:
    """The node key and the held lock of an initialised data dir (created first if ``init``)."""
    key_path = data_dir / KEY_NAME
    if not key_path.exists() and not init:
        raise StartupError(f"{data_dir} is not initialised (no {KEY_NAME}): run `syncnode init "
                           f"--data-dir {data_dir}` first, or pass --init to create it")
    if init:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = lock_data_dir(data_dir)
    try:
        if not key_path.exists():  # checked again under the lock: one key, whoever wins
            key = init_data_dir(data_dir)
            log.info("node key created", path=str(key_path))
            echo(f"created:   {data_dir} (new node key and {CONFIG_NAME})")
        else:
            key = read_key_file(key_path)
    except BaseException:
        os.close(fd)
        raise
    return key, fd


def saved_port(data_dir: Path) -> int | None:
    try:
        port = int((data_dir / PORT_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port <= 65535 else None


def save_port(data_dir: Path, port: int) -> None:
    tmp = data_dir / (PORT_NAME + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(data_dir / PORT_NAME)


def advertised(addresses: list[str], listen_host: str) -> list[str]:
    """The addresses to put in the ticket: those of ``listen``'s IP family.

    :meth:`proto.transport.iroh.IrohTransport.bind` also binds the other family's loopback or
    wildcard (``127.0.0.1`` -> ``[::1]:0``, ``0.0.0.0`` -> ``[::]:0``) to keep a loopback node
    on loopback; that socket gets a new random port at every start, so advertising it made the
    ticket change at every restart (:func:`proto.ticket.same_family`). To be reachable over
    IPv6, listen on an IPv6 address (``--listen [::]:7600``).
    """
    return same_family(addresses, listen_host)


def bind_error(what: str, value: str, exc: BaseException) -> StartupError:
    """One line for a failed bind, with the likely fix."""
    text = str(exc)
    port = value.rpartition(":")[2]
    proto, host = ("TCP", "HOST") if what == "--http" else ("UDP", "IP")
    if "os error 98" in text or getattr(exc, "errno", None) == errno.EADDRINUSE:
        return StartupError(f"cannot listen on {value} ({what}): {proto} port {port} is already "
                            f"in use; stop what uses it or pick another port ({what} {host}:PORT, "
                            f"port 0 picks a free one)")
    if "os error 99" in text or getattr(exc, "errno", None) == errno.EADDRNOTAVAIL:
        return StartupError(f"cannot listen on {value} ({what}): not an address of this machine;"
                            f" use one of its addresses, or 0.0.0.0 for all")
    if "os error 13" in text or getattr(exc, "errno", None) == errno.EACCES:
        return StartupError(f"cannot listen on {value} ({what}): permission denied (ports below "
                            f"1024 need privileges); pick a port >= 1024")
    last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1:] or [repr(exc)]
    return StartupError(f"cannot listen on {value} ({what}): {last[0]}")


async def open_http(value: str) -> list[trio.SocketListener]:
    host, port = parse_http(value)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise bind_error("--http", value, exc) from None


async def bind_iroh(key: SecretKey, config: Config, echo: Callable[[str], None]
                    ) -> tuple[IrohTransport, list[str]]:
    """Bind the iroh endpoint (reusing the previous port when ``listen`` has port 0) and return
    it with the addresses to advertise; remembers the port for the next start."""
    host, port = parse_listen(config.listen)
    kwargs: dict[str, Any] = {"relays": config.relays, "max_frame": config.limits.max_frame,
              "agent": f"syncnode/{version('syncnode')}"}
    transport = None
    previous = saved_port(config.data_dir) if port == 0 else None
    if previous is not None:
        try:
            transport = await IrohTransport.bind(key, listen=f"{host}:{previous}", **kwargs)
        except TransportError as exc:
            log.warning("port of the previous run is taken; binding a new one", port=previous,
                        error=" ".join(str(exc).split()))
    if transport is None:
        try:
            transport = await IrohTransport.bind(key, listen=config.listen, **kwargs)
        except TransportError as exc:
            raise bind_error("--listen", config.listen, exc) from None
    addrs = advertised(transport.addresses(), host)
    bound = int(addrs[0].rpartition(":")[2]) if addrs else 0
    if previous is not None and bound != previous:
        echo(f"note:      port {previous} of the previous run is taken; now on port {bound}: "
             f"the ticket changed, give devices the new one")
    if bound:
        save_port(config.data_dir, bound)
    return transport, addrs
