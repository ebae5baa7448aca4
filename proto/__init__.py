"""Shared, I/O-free core of syncnode: wire types and codec, framing, identities, transports.

Everything under ``proto`` is imported by both the syncnode daemon and the device agent, and by
the deterministic simulator, so nothing here may touch the disk or network except through the
transport implementations in :mod:`proto.transport`.
"""

PROTOCOL_VERSION = 1
"""Wire protocol version sent in the connection handshake (:mod:`proto.transport.handshake`)."""

SUPPORTED_VERSIONS = (1,)
