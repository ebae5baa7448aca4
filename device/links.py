"""One document's links to its syncnodes: dialling, liveness, redialling, address following.

:meth:`Links.keep` holds one link up for as long as the document is active: it dials (at the
address set by hand or learned, else the manifest's), authenticates, runs what the document does
over the link (:meth:`device.session.Session.serve`), and after a failure redials with
:class:`device.rules.Backoff`. A link counts as up (:attr:`Links.clients`) from its
subscription on, and only while its syncnode answers: the watchdog drops it when requests have
waited ``keepalive_timeout`` with no reply at all (:func:`device.rules.watchdog_wait`), and
the keepalive makes sure an idle link has a request to time.

Commits and durability need a quorum of links: :meth:`Links.wait_for_quorum` and
:meth:`Links.quorum_links` wait for one, and cut short the backoff of links that are waiting
to redial. A syncnode that moved is found through the others' signed address records
(:meth:`Links.follow_addresses`, :mod:`proto.address`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from device.replica import Replica
from device.rules import Backoff, has_quorum, nodes_to_locate, watchdog_wait
from proto import entropy
from proto.errors import SyncnodeError, TransportError
from proto.identity import short_id
from proto.logs import get_logger
from proto.rpc import RemoteError, SyncnodeClient
from proto.ticket import NodeTicket
from proto.wakeup import Signal

log = get_logger("device.document")

Serve = Callable[[SyncnodeClient], Awaitable[None]]
"""What runs over a link once it is authenticated (returns or raises when the link ends)."""


class Links:
    """One document's syncnode links (see the module doc)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.host = replica.host
        self.clients: dict[bytes, SyncnodeClient] = {}
        """The links that are up, by node id."""
        self.changed = Signal()
        """Fires when a link comes up or goes down."""
        self._backoff: dict[bytes, Backoff] = {}
        self._attempts: dict[bytes, trio.CancelScope] = {}
        self._pauses: dict[bytes, trio.CancelScope] = {}

    async def run(self, serve: Serve) -> None:
        """Keep a link to every syncnode of the current manifest, for as long as the document
        is active. The set follows the group's syncnodes: when an admin's commit adds one, a link
        to it starts as the commit is applied; when one is removed, its link closes (a removed
        syncnode refuses the group's new requests, and its acks no longer count)."""
        r = self.replica
        keeping: dict[bytes, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            while r.status == "active":
                wanted = {e.node_id: e for e in r.manifest.syncnodes}
                for node, scope in list(keeping.items()):
                    if node not in wanted:
                        scope.cancel()
                        del keeping[node]
                        log.info("syncnode no longer serves the document; link closed",
                                 doc=short_id(r.group_id), node=short_id(node))
                for node, entry in wanted.items():
                    if node not in keeping:
                        scope = keeping[node] = trio.CancelScope()
                        nursery.start_soon(self._keep_within, scope,
                                           NodeTicket(node, entry.addrs), serve)
                await r.epoch_changed.wait()

    async def _keep_within(self, scope: trio.CancelScope, ticket: NodeTicket, serve: Serve
                           ) -> None:
        with scope:
            await self.keep(ticket, serve)

    async def keep(self, ticket: NodeTicket, serve: Serve) -> None:
        """Keep the link to ``ticket``'s syncnode up, running ``serve`` over each connection."""
        cfg = self.host.config
        r = self.replica
        node = short_id(ticket.node_id)
        backoff = self._backoff[ticket.node_id] = Backoff(cfg.reconnect_min, cfg.reconnect_max)
        while r.status == "active":
            attempt = self._attempts[ticket.node_id] = trio.CancelScope()
            try:
                dial = self.host.syncnode_ticket(ticket)  # a newer address set by hand
                with attempt:
                    async with SyncnodeClient.connect(self.host.transport, dial,
                                                      timeout=cfg.connect_timeout) as client, \
                            trio.open_nursery() as guard:
                        guard.start_soon(self.watchdog, client)  # bounds every request below
                        await client.authenticate(self.host.key)
                        await serve(client)
            except* SyncnodeError as group:
                # Transport, remote and protocol errors end this link attempt, never the
                # device: it reconnects with backoff.
                log.info("syncnode link down", doc=short_id(r.group_id), node=node,
                         error="; ".join(str(e) for e in group.exceptions))
            finally:
                self.clients.pop(ticket.node_id, None)
                self.changed.fire()
            if r.status != "active":
                return
            if attempt.cancelled_caught:  # relink(): a new address, dial it now
                backoff.reset()
                continue
            delay = backoff.next()
            with trio.CancelScope() as pause:
                self._attempts[ticket.node_id] = self._pauses[ticket.node_id] = pause
                await trio.sleep(delay * entropy.uniform(0.5, 1.0))
            self._pauses.pop(ticket.node_id, None)

    def up(self, client: SyncnodeClient) -> None:
        """The link to ``client`` is subscribed: it counts from now on."""
        self._backoff[client.node_id].reset()
        self.clients[client.node_id] = client
        self.changed.fire()
        log.info("syncnode link up", doc=short_id(self.replica.group_id),
                 node=short_id(client.node_id))

    def relink(self, node_id: bytes) -> None:
        """Drop the link to ``node_id`` (or its pending dial) and dial again at once."""
        scope = self._attempts.get(node_id)
        if scope is not None:
            scope.cancel()

    def wake_below_quorum(self) -> None:
        """Without a quorum of links, dial at once every syncnode whose link is waiting out
        its reconnect backoff: this document needs a quorum now (a commit, a durability wait),
        and a syncnode that came back during a long backoff would otherwise be found up to
        ``reconnect_max`` late. A dial in progress is left alone (it reaches a syncnode that
        comes back). Once per wait, never on every change of the links: a dial that fails at
        once would otherwise be woken again at once, in a loop."""
        if not has_quorum(self.clients, self.replica.manifest.acceptors()):
            for pause in list(self._pauses.values()):
                pause.cancel()

    async def wait_for_quorum(self) -> None:
        """Give links a moment to come up (right after start, after a network change, or
        after stale links to restarted syncnodes were dropped)."""
        acceptors = self.replica.manifest.acceptors()
        self.wake_below_quorum()
        with trio.move_on_after(self.host.config.connect_timeout):
            while not has_quorum(self.clients, acceptors):
                await self.changed.wait()

    async def quorum_links(self) -> list[SyncnodeClient]:
        """The acceptors linked now (waiting, up to ``keepalive_timeout``, for a quorum of
        them). Paxos calls it at every ballot, so a link that comes back while a commit is
        under way is used by the commit's next ballot."""
        acceptors = self.replica.manifest.acceptors()
        self.wake_below_quorum()
        with trio.move_on_after(self.host.config.keepalive_timeout):
            while not has_quorum(self.clients, acceptors):
                await self.changed.wait()
        return [c for n, c in self.clients.items() if n in acceptors]

    async def wait_connected(self, count: int) -> None:
        while len(self.clients) < count:
            await self.changed.wait()

    # -- liveness ----------------------------------------------------------------------------

    async def keepalive(self, client: SyncnodeClient) -> None:
        """Ask for our head every ``keepalive_interval``, so that an idle link, too, has a
        request for the :meth:`watchdog` to time."""
        r = self.replica
        while r.status == "active":
            await trio.sleep(self.host.config.keepalive_interval)
            await client.heads([r.group_id])

    async def watchdog(self, client: SyncnodeClient) -> None:
        """A link counts as up only while its syncnode answers: drop it (it redials after
        ``reconnect_min``) when a request has waited ``keepalive_timeout`` with no reply at all.

        This bounds every request on the link, whoever made it. A dead or frozen syncnode
        does not close its QUIC connection, and one that restarted cannot (its new process
        does not know the old connection, and iroh gives up on it only after 30 s): requests
        on such a stale link would hang while the restarted syncnode answers a new connection
        at once. Silence is measured on the whole pipeline (:meth:`Channel.stalled_for`), not
        per request, so a busy syncnode working through many requests is not dropped."""
        limit = self.host.config.keepalive_timeout
        while True:
            wait = watchdog_wait(client.channel.stalled_for(), limit)
            if wait is None:
                raise TransportError(f"no answer within {limit:g} s")
            await trio.sleep(wait)

    # -- address following -----------------------------------------------------------------------

    async def follow_addresses(self, client: SyncnodeClient) -> None:
        """Ask this syncnode where the group's other syncnodes are now (their signed address
        records, :mod:`proto.address`), so a syncnode that moved is found again without a new
        document. Asked at link-up and every ``backfill_interval`` while one is unreachable."""
        r = self.replica
        while r.status == "active":
            others = nodes_to_locate([e.node_id for e in r.manifest.syncnodes], client.node_id,
                                     self.clients)
            if others is not None:
                try:
                    records = await client.get_addresses(others)
                except RemoteError as exc:  # a syncnode of an older version
                    log.debug("no address records", node=short_id(client.node_id),
                              error=str(exc))
                    return
                for record in records:
                    node = record.body.node_id
                    if node in others and node not in self.clients and record.verify() \
                            and self.host.learn_address(record):
                        log.info("syncnode moved; dialling its new address",
                                 doc=short_id(r.group_id), node=short_id(node),
                                 addrs=list(record.body.addrs), via=short_id(client.node_id))
                        self.relink(node)
            await trio.sleep(self.host.config.backfill_interval)
