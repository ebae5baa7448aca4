"""Daemon configuration: ``syncnode.toml`` in the data dir, overridable by command-line flags.

Unknown keys are errors (a typo must not silently fall back to a default), and every value is
type-checked with a message that names the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from proto.errors import ConfigError

CONFIG_NAME = "syncnode.toml"
KEY_NAME = "node.key"
DB_NAME = "syncnode.db"
STATE_NAME = "run-state.json"


@dataclass(frozen=True)
class Limits:
    """Per-node quotas and rate limits (section ``[limits]``)."""

    max_groups_per_key: int = 1000
    max_groups_per_connection: int = 100
    max_bytes_per_group: int = 1024 * 1024 * 1024
    max_mailbox_items_per_recipient: int = 256
    max_mailbox_ttl: int = 7 * 24 * 3600
    # mailbox quotas and budgets (syncnode/mailbox.py)
    max_mailbox_bytes: int = 1024 * 1024 * 1024
    max_mailbox_bytes_per_sender: int = 128 * 1024 * 1024
    max_join_request_bytes: int = 64 * 1024 * 1024
    max_join_requests_per_box: int = 16
    max_join_requests_per_sender: int = 32
    mailbox_put_bytes_per_second: float = 1024 * 1024.0
    mailbox_put_burst_bytes: int = 64 * 1024 * 1024
    requests_per_second: float = 2000.0
    request_burst: int = 4000
    max_frame: int = 16 * 1024 * 1024
    max_address_records: int = 4096
    # connections (syncnode/server.py)
    max_frame_unauthenticated: int = 256 * 1024
    max_connections: int = 4096
    max_connections_per_endpoint: int = 8
    max_streams_per_connection: int = 32
    max_requests_in_flight: int = 64
    max_reply_bytes_queued: int = 16 * 1024 * 1024
    max_subscriber_queue_bytes: int = 8 * 1024 * 1024
    idle_timeout: float = 300.0
    # groups (syncnode/service.py)
    max_groups: int = 100_000
    group_creations_per_second: float = 5.0
    group_creation_burst: int = 50
    endpoint_group_creations_per_hour: int = 120
    max_group_syncnodes: int = 9
    accept_groups_from: tuple[str, ...] = ()
    removed_group_retention: float = 7 * 24 * 3600.0
    """Seconds a group's data is kept after this node was removed from it (0: forever)."""
    # catch-up from peer syncnodes (syncnode/peers.py)
    peer_dials_per_second: float = 2.0
    peer_dial_burst: int = 20
    catchup_concurrency: int = 8


@dataclass(frozen=True)
class Config:
    data_dir: Path
    listen: str = "0.0.0.0:7600"
    relay: str = "off"
    http_listen: str = "127.0.0.1:7601"
    storage: str = ""
    """Where the data is: "" (``syncnode.db`` in the data dir), the path of a SQLite database,
    or a ``postgresql://`` URL (several processes of the node may share it)."""
    group_commit: bool = True
    cache_groups: int = 1024
    cache_slots: int = 4096
    catchup_interval: float = 30.0
    reconcile_interval: float = 10.0
    reconcile_groups_per_round: int = 256
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    peers: dict[str, list[str]] = field(default_factory=dict)
    """node id (hex) -> addresses: overrides the address hints in manifests."""

    @property
    def key_path(self) -> Path:
        return self.data_dir / KEY_NAME

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_NAME

    @property
    def database(self) -> str | Path:
        """The storage location :func:`syncnode.storage.open.open_storage` takes."""
        if not self.storage:
            return self.db_path
        if self.storage.startswith(("postgresql://", "postgres://")):
            return self.storage
        path = Path(self.storage).expanduser()
        return path if path.is_absolute() else self.data_dir / path

    @property
    def relays(self) -> list[str] | None:
        return None if self.relay == "off" else [self.relay]


DEFAULT_TOML = """\
# syncnode configuration. Every key is optional; the values shown are the defaults.
# Command-line flags (syncnode run --help) override this file.

# iroh endpoint: the UDP address to bind. Devices and peer syncnodes dial it.
listen = "0.0.0.0:7600"
# Relay server URL for NAT traversal, or "off" (direct addresses only).
relay = "off"
# /healthz, /readyz and /metrics. Keep it on loopback unless a firewall protects it.
http_listen = "127.0.0.1:7601"
# Where the data is: "" keeps it in syncnode.db in the data dir (SQLite, the default). A
# "postgresql://user@host/db" URL puts it in PostgreSQL, where several `syncnode run`
# processes with the same node.key can share it and act as one syncnode (README: "Moving to
# PostgreSQL"). Move an existing node's data with `syncnode migrate-storage`.
storage = ""
# Batch concurrent writes into one transaction and one fsync. Turning it off is only useful
# for benchmarks: every write then pays its own fsync.
group_commit = true
# Per-group state kept in memory (least recently used groups are dropped, and reloaded on use).
cache_groups = 1024
cache_slots = 4096
# Seconds between checks that this node has every decision its peers have.
catchup_interval = 30.0
# Anti-entropy: seconds between rounds in which this node compares its copy of groups with
# each group's other syncnodes (a 16-byte digest per group; envelopes only where they differ)
# and fetches what it lacks (0: never). Each round covers the groups with traffic lately and
# the next reconcile_groups_per_round of all hosted groups (round robin), so every group is
# compared at least once per (groups / reconcile_groups_per_round) rounds.
reconcile_interval = 10.0
reconcile_groups_per_round = 256
# debug, info, warning or error. Logs are JSON lines on stderr unless stderr is a terminal.
log_level = "info"

[limits]
max_groups_per_key = 1000
max_groups_per_connection = 100
max_bytes_per_group = 1073741824
max_mailbox_items_per_recipient = 256
max_mailbox_ttl = 604800
# Bytes all mailbox items may take together (each counted as payload + 256 bytes of overhead).
max_mailbox_bytes = 1073741824
# Bytes of live items one sender may have (a member's key; a join request's endpoint id).
max_mailbox_bytes_per_sender = 134217728
# Share of max_mailbox_bytes for join requests (anyone may send one); when full, the oldest go.
max_join_request_bytes = 67108864
# Join requests waiting in one invite's box.
max_join_requests_per_box = 16
# Join requests waiting from one endpoint id.
max_join_requests_per_sender = 32
# Mailbox bytes one endpoint id may put per second (token bucket with this burst).
mailbox_put_bytes_per_second = 1048576.0
mailbox_put_burst_bytes = 67108864
requests_per_second = 2000.0
request_burst = 4000
# Largest request frame (bytes) from a connection that has authenticated a key.
max_frame = 16777216
# Signed address records of other syncnodes kept for relaying to devices (one per node).
max_address_records = 4096

# -- connections: every limit below applies before any authentication (SECURITY.md) --
# Largest frame (bytes) a connection may send before it has authenticated a key.
max_frame_unauthenticated = 262144
# Open connections in total, and from one endpoint id.
max_connections = 4096
max_connections_per_endpoint = 8
# Concurrent streams of one connection (each subscription holds one).
max_streams_per_connection = 32
# Requests of one connection being handled at once (over all its streams).
max_requests_in_flight = 64
# Reply bytes waiting for a client to read them; beyond this its requests are not read.
max_reply_bytes_queued = 16777216
# Pushed bytes waiting for a subscriber; beyond this it is dropped (it reconnects, backfills).
max_subscriber_queue_bytes = 8388608
# Seconds without a request or subscription after which a connection is closed (0: never).
idle_timeout = 300.0

# -- groups --
# Groups this node hosts in total.
max_groups = 100000
# New groups per second over the whole node (token bucket with this burst).
group_creations_per_second = 5.0
group_creation_burst = 50
# New groups one endpoint id may register per hour.
endpoint_group_creations_per_hour = 120
# Syncnodes a group may name (each is dialled for catch-up).
max_group_syncnodes = 9
# Creator key fingerprints (hex) allowed to register new groups; empty: anyone.
# (Also applies to AdoptGroup: a group this node is added to after its genesis.)
accept_groups_from = []
# Seconds to keep a group's data after a commit removed this node from it (it answers GONE to
# new writes meanwhile, and still serves the log so devices learn where the group went).
# 0: keep it forever.
removed_group_retention = 604800.0

# -- catch-up: dialling the peer syncnodes a group names --
# Outbound dials per second (token bucket with this burst); a peer that failed backs off.
peer_dials_per_second = 2.0
peer_dial_burst = 20
# Groups caught up at once.
catchup_concurrency = 8

# Addresses of peer syncnodes, by node id, when the hints in group manifests are stale:
# [peers]
# "3f1c...node id hex..." = ["203.0.113.7:7600"]
"""


def _check(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = True
    if not ok:
        kind = ("a list of strings" if isinstance(default, tuple)
                else "a whole number >= 0" if type(default) is int
                else type(default).__name__)
        raise ConfigError(f"{name}: expected {kind}, got {value!r}")
    return value


def _apply(obj: Any, table: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known or key == "data_dir":
            raise ConfigError(f"{where}: unknown setting {key!r} "
                              f"(known: {', '.join(sorted(k for k in known if k != 'data_dir'))})")
        current = getattr(obj, key)
        if key == "limits":
            if not isinstance(value, dict):
                raise ConfigError("[limits] must be a table")
            changes[key] = _apply(current, value, "[limits]")
        elif key == "peers":
            if not isinstance(value, dict) or not all(
                    isinstance(v, list) and all(isinstance(a, str) for a in v)
                    for v in value.values()):
                raise ConfigError("[peers]: each entry is node-id-hex = [\"host:port\", ...]")
            changes[key] = value
        else:
            changes[key] = _check(f"{where} {key}" if where else key, value, current)
    return replace(obj, **changes)


def load_config(data_dir: Path, config_file: Path | None = None) -> Config:
    """The configuration of ``data_dir``: defaults, then ``config_file`` (default: the data
    dir's ``syncnode.toml`` if present)."""
    config = Config(data_dir=data_dir)
    path = config_file or data_dir / CONFIG_NAME
    if config_file is not None and not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.exists():
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        config = _apply(config, table, "")
    for creator in config.limits.accept_groups_from:
        try:
            ok = len(bytes.fromhex(creator)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"[limits] accept_groups_from: {creator!r} is not a key fingerprint "
                              "(64 hex digits: `syncdevice --json init` prints it as \"device\")")
    if config.storage and "://" in config.storage and not config.storage.startswith(
            ("postgresql://", "postgres://")):
        raise ConfigError(f"storage: {config.storage!r} is neither a path nor a postgresql:// "
                          "URL")
    if config.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: {config.log_level!r} is not debug/info/warning/error")
    return config
