"""What a document's engine needs from the device it runs on: the :class:`Host` protocol.

The engine modules (:mod:`device.replica`, :mod:`device.outbox`, :mod:`device.inbox`,
:mod:`device.membership`, :mod:`device.links`, :mod:`device.session`, :mod:`device.invites`)
depend on this small interface, never on :mod:`device.agent`: the agent creates documents, so
an engine that imported it back would close an import cycle. :class:`device.agent.Device`
satisfies it; a test can pass anything with the same attributes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from device.config import DeviceConfig
from device.mls import MlsClient
from device.store import Store
from proto.address import AddressRecord
from proto.identity import SecretKey
from proto.ticket import NodeTicket
from proto.transport.base import Transport


class Host(Protocol):
    """The device as its documents see it."""

    store: Store
    """The device's SQLite store (every document's tables, one transaction per engine step)."""
    config: DeviceConfig
    key: SecretKey
    """The device's MLS signature key (signs envelopes, values, Paxos requests)."""
    fingerprint: bytes
    mls: MlsClient
    transport: Transport

    @property
    def id(self) -> str: ...

    @property
    def endpoint_id(self) -> bytes: ...

    def addresses(self) -> tuple[str, ...]:
        """Where other devices can reach this one directly (dialling hints)."""
        ...

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` as a background task of the device (it outlives the caller)."""
        ...

    def syncnode_ticket(self, ticket: NodeTicket) -> NodeTicket:
        """``ticket`` with the addresses this device holds for its node (set by hand or
        learned), tried first."""
        ...

    def learn_address(self, record: AddressRecord) -> bool:
        """Keep a verified address record if it is news; True if the addresses changed."""
        ...

    def offer_arrived(self) -> None:
        """A new document was offered to this device through one of its groups and recorded
        (:func:`device.offers.take_offer`): join it in the background."""
        ...
