"""Prometheus metrics of one syncnode (``prometheus_client``, one registry per node so several
nodes can live in one test process)."""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


def log_buckets(low: float, high: float, n: int) -> list[float]:
    """``n`` log-spaced histogram bounds from ``low`` to ``high``."""
    step = (math.log(high) - math.log(low)) / (n - 1)
    return [float(f"{math.exp(math.log(low) + i * step):.3g}") for i in range(n)]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections_open = Gauge("syncnode_connections_open", "Open connections",
                                      registry=r)
        self.connections = Counter("syncnode_connections", "Connections accepted", registry=r)
        self.groups = Gauge("syncnode_groups", "Groups hosted", registry=r)
        self.requests = Counter("syncnode_requests", "Requests by type", ["type"], registry=r)
        self.errors = Counter("syncnode_errors", "Error replies by code", ["code"], registry=r)
        self.paxos = Counter("syncnode_paxos_messages", "Paxos messages by type", ["type"],
                             registry=r)
        self.decisions = Counter("syncnode_decisions", "Decisions stored", registry=r)
        self.equivocations = Counter("syncnode_equivocations",
                                     "Conflicting certificates detected", registry=r)
        self.messages_stored = Counter("syncnode_messages_stored", "Envelopes stored (new)",
                                       registry=r)
        self.messages_served = Counter("syncnode_messages_served", "Envelopes served by backfill",
                                       registry=r)
        self.messages_pushed = Counter("syncnode_messages_pushed", "Envelopes pushed live",
                                       registry=r)
        self.bytes_in = Counter("syncnode_bytes_received", "Request bytes received", registry=r)
        self.bytes_out = Counter("syncnode_bytes_sent", "Reply bytes sent", registry=r)
        self.storage_bytes = Gauge("syncnode_storage_bytes", "Database size on disk",
                                   registry=r)
        self.batch_size = Histogram("syncnode_write_batch_size", "Writes per committed batch",
                                    buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096],
                                    registry=r)
        self.fsync_seconds = Histogram("syncnode_commit_seconds",
                                       "Batch commit time including fsync",
                                       buckets=log_buckets(0.0001, 1.0, 13), registry=r)
        self.rate_limited = Counter("syncnode_rate_limited", "Requests refused by rate limit",
                                    registry=r)
        self.disconnects = Counter("syncnode_protocol_disconnects",
                                   "Connections dropped for malformed or oversized frames",
                                   registry=r)
        self.refused = Counter(
            "syncnode_refused", "Requests or connections refused by a limit or check, by reason "
            "(an attack shows up here first)", ["reason"], registry=r)

    def refuse(self, reason: str) -> None:
        """Count one refusal. ``reason`` is a short fixed token (``frame_too_large``,
        ``mailbox_full``, ...): never a value taken from the request."""
        self.refused.labels(reason).inc()

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.fsync_seconds.observe(seconds)

    def track_storage(self, size: Callable[[], int]) -> None:
        self.storage_bytes.set_function(size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
