"""The device's settings (:class:`DeviceConfig`), in a module of their own: every part of the
engine reads them, and none of those parts should have to import the device agent for that.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.mls import DEFAULT_EPOCH_RETENTION


@dataclass(frozen=True)
class DeviceConfig:
    flush_interval: float = 0.0
    """Extra minimum spacing of two updates of one document (edits in between are coalesced).
    Usually unnecessary: waiting for the previous update's quorum ack already batches."""
    coalesce_max: float = 0.25
    """While our last update waits for its quorum acknowledgement (at most this long), new
    edits are coalesced into the next update."""
    epoch_retention: int = DEFAULT_EPOCH_RETENTION
    """Past MLS epochs whose secrets are kept, so late messages of those epochs decrypt."""
    snapshot_every: int = 2000
    """Stored CRDT updates are folded into one snapshot after this many."""
    publish_state_every: int = 5000
    """After this many edit updates with no whole-document state seen on the syncnodes, this
    device stores one there (encrypted), so new devices can load it with no member online."""
    compact_every_updates: int = 10_000
    """Compact the document's history on the syncnodes (:mod:`device.compaction`) after this
    many updates delivered or sealed here since the last compaction (0: no count threshold)."""
    compact_every_bytes: int = 64 * 1024 * 1024
    """... or after this many bytes of CRDT updates, whichever comes first (0: no byte
    threshold; both 0: compaction only by ``doc.compact()`` / ``syncdevice compact``)."""
    compact_jitter: float = 5.0
    """An automatic compaction first waits a random time up to this many seconds, so members
    that cross the threshold together rarely both propose."""
    compact_wait: float = 30.0
    """How long a compaction waits for a quorum of syncnodes to store its state."""
    connect_timeout: float = 10.0
    reconnect_min: float = 0.2
    reconnect_max: float = 10.0
    propose_attempts: int = 12
    propose_backoff: float = 0.02
    rebase_attempts: int = 8
    max_in_flight: int = 256
    mailbox_interval: float = 10.0
    """Safety net: how often a device with open invites reads its mailbox even without a
    notice (syncnodes push one when a join request arrives)."""
    keepalive_interval: float = 2.0
    """An idle syncnode link asks for the group's head this often, so that a syncnode that
    died, froze or restarted is noticed without traffic of our own (see keepalive_timeout)."""
    keepalive_timeout: float = 3.0
    """A syncnode link whose requests have waited this long with no reply of any kind counts
    as down, and is dropped and dialled again at once (a restarted syncnode cannot close its
    old connection). It also bounds the waits of a commit when no quorum answers; with a
    quorum, commits and durability acks never wait for the others."""
    fast_poll_interval: float = 0.02
    fast_poll_window: float = 120.0
    """For this long after making an invite (inviter) or starting a join (new device), poll
    every ``fast_poll_interval`` instead: an interactive join completes in a fraction of a
    second, without polling the syncnodes that often the rest of the time."""
    sync_request_interval: float = 3.0
    gap_wait: float = 30.0
    """A gap (updates causal delivery waits for, from no syncnode) is asked about among the
    members once every syncnode was backfilled from since it appeared, or after this long."""
    gap_retry_max: float = 600.0
    """A gap no member answered for is asked about again after ``sync_request_interval``,
    doubling up to this many seconds."""
    backfill_interval: float = 30.0
    """Safety net: re-ask each syncnode for envelopes past our watermarks this often (covers a
    push lost on the way; normally finds nothing)."""
    holdings_interval: float = 60.0
    """How often each syncnode's signed heads are fetched and checked against its acks and
    earlier statements (and after every reconnect): :mod:`device.witness`."""
    join_poll_interval: float = 1.0
    p2p_state_transfer: bool = True
    """On join, fetch the document directly from the inviter (else only via the syncnodes)."""
    rotate_keys_after: float = 7 * 24 * 3600.0
    """Post-compromise security: commit a key update of our own MLS leaf this many seconds
    after our last own commit (0: no time threshold). See :mod:`device.rotation`."""
    rotate_keys_after_messages: int = 10_000
    """... or after sending this many updates since then, whichever comes first (0: no
    message threshold; both 0: no periodic rotation)."""
    rotate_keys_backoff_max: float = 300.0
    """A periodic rotation that failed (offline, contention) is retried with a doubling
    backoff up to this many seconds."""
    join_offers: bool = True
    """Join, in the background, the documents an admin makes with the members of a document
    of ours (:mod:`device.group_docs`). Off: offers are only recorded, and joined by the next
    run with it on (the CLI turns it on only in ``watch``: a join must stay in one process from
    its request to the Welcome, because the KeyPackage's private key lives in memory)."""
    listen: str = "127.0.0.1:0"
    relays: tuple[str, ...] = ()
    """iroh relay URLs; empty for direct connections only."""
