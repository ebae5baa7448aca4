"""``syncnode run``: wire config, key, store, iroh endpoint, peer sync and HTTP together.

Start-up (:mod:`syncnode.startup`): check the addresses, claim the data dir (its node key and
its exclusive lock), bind HTTP and iroh, then open the database and serve. A failure before
serving is a :class:`~syncnode.startup.StartupError` with a one-line message.

Shutdown order on SIGINT/SIGTERM (bounded by :data:`SHUTDOWN_GRACE` seconds): stop being ready,
stop accepting and cancel connection handlers, let the writer finish every queued write (a
started batch always completes), close the database, close the endpoint, release the data dir.
:func:`run_daemon` then returns normally: ``syncnode run`` exits 0 after a requested stop.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import trio

from proto.identity import SecretKey, node_id_hex, parse_node_id
from proto.logs import get_logger
from proto.ticket import NodeTicket
from proto.transport.iroh import IrohTransport
from syncnode.config import STATE_NAME, Config
from syncnode.history import HistoryPull
from syncnode.http import HealthServer
from syncnode.peers import PeerSync
from syncnode.reconcile import Reconciler
from syncnode.server import Server
from syncnode.service import Service
from syncnode.startup import (
    StartupError,
    bind_iroh,
    claim_data_dir,
    open_http,
    parse_http,
    parse_listen,
)
from syncnode.storage.open import is_postgres

log = get_logger("syncnode.daemon")

SHUTDOWN_GRACE = 5.0
MAILBOX_SWEEP = 300.0
RETENTION_SWEEP = 3600.0
"""Seconds between looks for removed groups whose retention is over."""


SERVED = False
STOPPED = False
"""Set once the node served, and once its graceful stop finished: a second SIGINT queued during
the stop is re-raised by trio as KeyboardInterrupt when the signal receiver closes, after
everything was closed (two SIGINTs in a row: a terminal's Ctrl-C plus a parent's)."""


async def run_daemon(config: Config, *, init: bool = False,
                     echo: Callable[[str], None] = print) -> None:
    """Run the node until SIGINT or SIGTERM, then stop gracefully and return.

    Raises :class:`~syncnode.startup.StartupError` (one line) for what the operator can fix:
    bad addresses, an uninitialised or already used data dir, a busy port. Nothing is served
    before every check passed and every socket is bound. A signal received during start-up is
    handled once the node is up: it then stops at once, also gracefully.
    """
    parse_listen(config.listen)
    parse_http(config.http_listen)
    global STOPPED
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            key, lock_fd = claim_data_dir(config.data_dir, init=init, echo=echo)
            try:
                if is_postgres(config.database):
                    await check_database(str(config.database), key.public)
                async with AsyncExitStack() as stack:
                    listeners = await open_http(config.http_listen)
                    for listener in listeners:
                        stack.push_async_callback(listener.aclose)
                    transport, addrs = await bind_iroh(key, config, echo)
                    stack.push_async_callback(_close_transport, transport)
                    await _serve(config, key, transport, addrs, listeners, signals, echo)
            finally:
                os.close(lock_fd)  # after the database is closed: the next daemon may start
            STOPPED = SERVED
            log.info("syncnode stopped")
            echo("stopped")
    finally:
        if STOPPED:
            ignore_stop_signals()  # done: a late SIGINT must not turn a clean stop into 130


def ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


async def _close_transport(transport: IrohTransport) -> None:
    with trio.move_on_after(SHUTDOWN_GRACE):
        await transport.aclose()


async def _serve(config: Config, key: SecretKey, transport: IrohTransport, addrs: list[str],
                 listeners: list[trio.SocketListener], signals: AsyncIterator[int],
                 echo: Callable[[str], None]) -> None:
    service = Service(key, config.database, limits=config.limits,
                      group_commit=config.group_commit, cache_groups=config.cache_groups,
                      cache_slots=config.cache_slots)
    server = Server(service)
    overrides = {parse_node_id(k): v for k, v in config.peers.items()}
    peers = PeerSync(service, transport, overrides=overrides, interval=config.catchup_interval)
    history = HistoryPull(service, peers)
    reconciler = Reconciler(service, peers, history, interval=config.reconcile_interval,
                            groups_per_round=config.reconcile_groups_per_round)
    ready = False
    health = HealthServer(service.metrics.exposition, lambda: ready)
    http_host = parse_http(config.http_listen)[0]

    async with trio.open_nursery() as outer:
        await outer.start(service.run)
        async with trio.open_nursery() as serving:
            await serving.start(transport.serve, server.handle_connection)
            http_port = await serving.start(health.serve, listeners)
            if getattr(service.store, "shared", False):  # several processes: list them all
                addrs = await serving.start(_processes, service, addrs)
            service.addresses.set_own(addrs)  # the peer sweep hands it to our peers
            serving.start_soon(peers.run)
            serving.start_soon(history.run)
            serving.start_soon(reconciler.run)
            serving.start_soon(service.hosting.retention, RETENTION_SWEEP)
            serving.start_soon(_mailbox_sweeper, service)

            ticket = NodeTicket(key.public, tuple(addrs))
            groups = await service.group_count()
            _write_state(config, ticket, http_host, http_port)
            echo(f"node id:   {node_id_hex(key.public)}")
            echo(f"ticket:    {ticket}")
            echo(f"listening: {', '.join(addrs)}")
            echo(f"http:      http://{_url_host(http_host)}:{http_port}/metrics")
            echo(f"data dir:  {config.data_dir}  ({groups} groups)")
            log.info("syncnode ready", node_id=node_id_hex(key.public),
                     addrs=addrs, bound=transport.addresses(), http_port=http_port,
                     groups=groups, ticket=str(ticket))
            ready = True
            global SERVED
            SERVED = True

            async for signum in signals:
                log.info("shutting down", signal=signal.Signals(signum).name)
                echo(f"received {signal.Signals(signum).name}, shutting down")
                break
            ready = False
            serving.cancel_scope.cancel()
        with trio.move_on_after(SHUTDOWN_GRACE) as grace:
            await service.aclose()
        if grace.cancelled_caught:
            log.error("writer did not drain in time; queued writes were not acknowledged")
            outer.cancel_scope.cancel()


async def check_database(url: str, node_id: bytes) -> None:
    """Reach the PostgreSQL database, migrate it and bind it to this node before anything is
    served; a StartupError (one line) otherwise."""
    from syncnode.storage.postgres_schema import preflight

    try:
        await trio.to_thread.run_sync(preflight, url, node_id)
    except RuntimeError as exc:
        raise StartupError(str(exc)) from None


PROCESS_HEARTBEAT = 5.0
"""Seconds between a process's heartbeats in the shared database; one unseen for three of them
is left out of the ticket and the address record."""


async def _processes(service: Service, own: list[str], *,
                     task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """Several processes, one node (shared storage): record this process's addresses in the
    database with a heartbeat, and advertise every live process's (own first, at most 8, in
    the ticket and the signed address record), so a device or peer that cannot reach one
    process dials another. The record is dropped at a clean stop."""
    import socket

    store: Any = service.store
    token = os.urandom(8).hex()
    started = False
    try:
        while True:
            now = time.time()
            try:
                await store.register_process(token, own, os.getpid(), socket.gethostname(),
                                             now)
                others = [a for t, addrs in await store.live_processes(
                    now - 3 * PROCESS_HEARTBEAT) if t != token for a in addrs]
            except Exception as exc:  # the database is away: keep what we advertise
                if not started:
                    raise
                log.warning("process heartbeat failed", error=str(exc))
                await trio.sleep(PROCESS_HEARTBEAT)
                continue
            every = list(dict.fromkeys([*own, *others]))[:8]
            if not started:
                task_status.started(every)
                started = True
            elif every != list(service.addresses.own.body.addrs if service.addresses.own
                               else ()):
                service.addresses.set_own(every)
            await trio.sleep(PROCESS_HEARTBEAT)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await store.drop_process(token)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _mailbox_sweeper(service: Service) -> None:
    while True:
        await trio.sleep(MAILBOX_SWEEP)
        await service.expire_mailbox()


def _write_state(config: Config, ticket: NodeTicket, http_host: str, http_port: int) -> None:
    """Record how to reach the running node, for ``syncnode info`` and scripts."""
    state = {"node_id": ticket.node_id.hex(), "ticket": str(ticket), "addrs": list(ticket.addrs),
             "http": f"http://{_url_host(http_host)}:{http_port}", "pid": os.getpid()}
    tmp = config.data_dir / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(config.data_dir / STATE_NAME)
