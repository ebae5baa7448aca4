"""Shared, I/O-free core of syncnode: wire types and codec, framing, identities, transports.

Everything under ``proto`` is imported by both the syncnode daemon and the device agent, and by
the deterministic simulator, so nothing here may touch the disk or network except through the
transport implementations in :mod:`proto.transport`.
"""

PROTOCOL_VERSION = 3
"""Wire protocol version sent in the connection handshake (:mod:`proto.transport.handshake`).
2: signed acks and backfill answers (``Stored``, ``BackfillPage`` changed shape), holdings,
anti-entropy and compaction messages (issue 17). A version-1 peer is refused at the handshake
with a clear error instead of failing to decode.
3: the Paxos fast path (``AcceptLeased`` 0x66, ``AcceptedLeased`` 0x67; issue 19)."""

SUPPORTED_VERSIONS = (3,)
