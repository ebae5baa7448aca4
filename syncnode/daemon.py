"""``syncnode run``: wire config, key, store, iroh endpoint, peer sync and HTTP together.

Shutdown order on SIGINT/SIGTERM (bounded by :data:`SHUTDOWN_GRACE` seconds): stop being ready,
stop accepting and cancel connection handlers, let the writer finish every queued write (a
started batch always completes), close the database, close the endpoint.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from importlib.metadata import version

import trio

from proto.identity import load_or_create_key, node_id_hex, parse_node_id
from proto.logs import get_logger
from proto.ticket import NodeTicket
from proto.transport.iroh import IrohTransport
from syncnode.config import STATE_NAME, Config
from syncnode.http import HealthServer
from syncnode.peers import PeerSync
from syncnode.server import Server
from syncnode.service import Service

log = get_logger("syncnode.daemon")

SHUTDOWN_GRACE = 5.0
MAILBOX_SWEEP = 300.0


def _split_host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def run_daemon(config: Config, *, echo: Callable[[str], None] = print) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key, created = load_or_create_key(config.key_path)
    if created:
        log.info("node key created", path=str(config.key_path))
    service = Service(key, config.db_path, limits=config.limits,
                      group_commit=config.group_commit, cache_groups=config.cache_groups,
                      cache_slots=config.cache_slots)
    transport = await IrohTransport.bind(key, listen=config.listen, relays=config.relays,
                                         max_frame=config.limits.max_frame,
                                         agent=f"syncnode/{version('syncnode')}")
    server = Server(service)
    overrides = {parse_node_id(k): v for k, v in config.peers.items()}
    peers = PeerSync(service, transport, overrides=overrides, interval=config.catchup_interval)
    ready = False
    health = HealthServer(service.metrics.exposition, lambda: ready)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:
            await outer.start(service.run)
            async with trio.open_nursery() as serving:
                await serving.start(transport.serve, server.handle_connection)
                host, port = _split_host_port(config.http_listen)
                http_port = await serving.start(health.serve, host, port)
                serving.start_soon(peers.run)
                serving.start_soon(_mailbox_sweeper, service)

                ticket = NodeTicket(key.public, tuple(transport.addresses()))
                groups = service.group_count()
                _write_state(config, ticket, host, http_port)
                echo(f"node id:   {node_id_hex(key.public)}")
                echo(f"ticket:    {ticket}")
                echo(f"listening: {', '.join(transport.addresses())}")
                echo(f"http:      http://{host}:{http_port}/metrics")
                echo(f"data dir:  {config.data_dir}  ({groups} groups)")
                log.info("syncnode ready", node_id=node_id_hex(key.public),
                         addrs=transport.addresses(), http_port=http_port,
                         groups=groups, ticket=str(ticket))
                ready = True

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
        with trio.move_on_after(SHUTDOWN_GRACE):
            await transport.aclose()
    log.info("syncnode stopped")
    echo("stopped")


async def _mailbox_sweeper(service: Service) -> None:
    while True:
        await trio.sleep(MAILBOX_SWEEP)
        await service.expire_mailbox()


def _write_state(config: Config, ticket: NodeTicket, http_host: str, http_port: int) -> None:
    """Record how to reach the running node, for ``syncnode info`` and scripts."""
    state = {"node_id": ticket.node_id.hex(), "ticket": str(ticket), "addrs": list(ticket.addrs),
             "http": f"http://{http_host}:{http_port}", "pid": os.getpid()}
    tmp = config.data_dir / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(config.data_dir / STATE_NAME)
