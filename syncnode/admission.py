"""Group admission: whether this syncnode takes a new group (``RegisterGroup``), and storing
its genesis.

Anyone may ask a syncnode to host a group (by ``RegisterGroup``, or ``AdoptGroup``:
:mod:`syncnode.hosting`), so every new group is checked against the
operator's allow-list and bounded (SECURITY.md): the node-wide count and creation rate,
per-endpoint, per-connection and per-creator counts, and the number of syncnodes a genesis may
name (each one a peer that catch-up would dial). Registering the same genesis again is
idempotent; another genesis under a taken id is a CONFLICT.
"""

from __future__ import annotations

from collections.abc import Callable

from proto.errors import DecodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import LogValue, ManifestError, validate_genesis
from proto.messages import ErrorCode
from proto.service import GroupRegistered, RegisterGroup
from syncnode.budgets import KeyedBuckets, TokenBucket
from syncnode.config import Limits
from syncnode.groups import Groups
from syncnode.metrics import Metrics
from syncnode.session import RequestError, Session
from syncnode.storage import Storage, StorageConflict

log = get_logger("syncnode.service")


class Admission:
    def __init__(self, node_id: bytes, store: Storage, groups: Groups, limits: Limits,
                 metrics: Metrics, *, clock: Callable[[], float],
                 now: Callable[[], float]) -> None:
        """``clock`` paces the creation rates; ``now`` stamps a group's creation."""
        self.node_id = node_id
        self.store = store
        self.groups = groups
        self.limits = limits
        self.metrics = metrics
        self.now = now
        self.creations = TokenBucket(limits.group_creations_per_second,
                                     limits.group_creation_burst, clock)
        self.endpoint_creations = KeyedBuckets(limits.endpoint_group_creations_per_hour / 3600,
                                               limits.endpoint_group_creations_per_hour, clock)
        self.allowed_creators = {bytes.fromhex(h) for h in limits.accept_groups_from}

    async def register(self, session: Session, msg: RegisterGroup) -> GroupRegistered:
        value = check_genesis(msg.value)
        m = value.manifest
        if self.node_id not in m.acceptors():
            raise RequestError(ErrorCode.INVALID, "the genesis does not name this syncnode")
        existing = await self.groups.get(m.group_id)
        if existing is not None:
            stored = await self.store.decided(m.group_id, 0)
            if stored is not None and stored.value == msg.value:
                return GroupRegistered(m.group_id, False)
            raise RequestError(ErrorCode.CONFLICT, "a different group has this id")
        await self.admit(session, value)
        try:
            created = await self.store.create_group(m.group_id, value.signer, msg.value,
                                                    self.now())
        except StorageConflict:
            raise RequestError(ErrorCode.CONFLICT, "a different group has this id") from None
        if created:
            session.groups_created += 1
            self.metrics.groups.inc()
            log.info("group created", group=short_id(m.group_id), creator=short_id(value.signer),
                     syncnodes=len(m.syncnodes), peer=short_id(session.remote_id))
        return GroupRegistered(m.group_id, created)

    async def admit(self, session: Session, value: LogValue) -> None:
        """Raise unless this node takes one more group from this creator and connection: the
        operator's allow-list, the node-wide count and creation rate, per-endpoint, -connection
        and -creator counts, and a bound on the peers catch-up would dial (SECURITY.md)."""
        lim, m = self.limits, value.manifest

        def refuse(reason: str, code: ErrorCode, detail: str) -> None:
            self.metrics.refuse(reason)
            raise RequestError(code, detail)

        if self.allowed_creators and value.signer not in self.allowed_creators:
            refuse("creator_not_allowed", ErrorCode.UNAUTHORIZED,
                   "this syncnode accepts new groups only from keys its operator listed")
        if len(m.syncnodes) > lim.max_group_syncnodes:
            refuse("too_many_syncnodes", ErrorCode.INVALID,
                   f"a group may name at most {lim.max_group_syncnodes} syncnodes here")
        if await self.store.group_count() >= lim.max_groups:
            refuse("node_group_quota", ErrorCode.QUOTA_EXCEEDED,
                   "this syncnode hosts as many groups as its operator allows")
        if session.groups_created >= lim.max_groups_per_connection:
            refuse("connection_group_quota", ErrorCode.QUOTA_EXCEEDED,
                   f"at most {lim.max_groups_per_connection} new groups per connection")
        if await self.store.group_count_by_creator(value.signer) >= lim.max_groups_per_key:
            refuse("creator_group_quota", ErrorCode.QUOTA_EXCEEDED,
                   f"at most {lim.max_groups_per_key} groups per creator")
        if not self.creations.take():
            refuse("group_creation_rate", ErrorCode.RATE_LIMITED,
                   "too many new groups on this syncnode just now; retry in a few seconds")
        if not self.endpoint_creations.take(session.remote_id):
            refuse("endpoint_group_creation_rate", ErrorCode.RATE_LIMITED,
                   f"at most {lim.endpoint_group_creations_per_hour} new groups per hour "
                   "from one endpoint")


def check_genesis(raw: bytes) -> LogValue:
    """The decoded genesis, or INVALID unless it is a well-formed, signed genesis."""
    try:
        value = LogValue.decode(raw)
        validate_genesis(value.manifest.group_id, value)
    except (DecodeError, ManifestError) as exc:
        raise RequestError(ErrorCode.INVALID, f"bad genesis: {exc}") from None
    return value
