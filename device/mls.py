"""The MLS adapter: the only module that imports the ``mls_rs_uniffi`` binding.

It patches the binding (the per-byte buffer copy fix), stores group state in the device's
SQLite database (:class:`SqliteGroupStorage`, with a bounded number of past epochs kept so late
messages still decrypt), and wraps groups in :class:`MlsGroup`, whose methods raise
:class:`MlsError` instead of the binding's exceptions.

The rules the device engine builds on (notes/mls.md): building a commit does not apply it
(Paxos decides first; a losing commit is dropped by processing the winner); nothing is written
to storage until :meth:`MlsGroup.persist`, which the engine calls inside the same SQLite
transaction that records what it did, and always before a ciphertext leaves the device.
A member's MLS credential identity is its signature public key, so a member is named by
:func:`identity_for` from the manifest alone.
"""

from __future__ import annotations

import functools
import sqlite3
from typing import Any

import mls_rs_uniffi
import mls_rs_uniffi.mls_rs_uniffi as _generated

from proto.errors import SyncnodeError
from proto.identity import SecretKey
from proto.transport.uniffi_trio import patch_module

patch_module(_generated, async_api=False)

CIPHER_SUITE = mls_rs_uniffi.CipherSuite.CURVE25519_AES128
DEFAULT_EPOCH_RETENTION = 64


class MlsError(SyncnodeError):
    """The MLS library refused an operation. ``future_epoch``: the message is for an epoch we
    have not reached (buffer it); ``unknown_epoch``: it is for an epoch we no longer (or never)
    had the secrets of."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.future_epoch = False
        self.unknown_epoch = "Epoch not found" in message


def _mls(what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except mls_rs_uniffi.Error as exc:
        raise MlsError(f"{what}: {exc}") from None


class SqliteGroupStorage(mls_rs_uniffi.GroupStateStorage):  # type: ignore[misc]
    """Group state in the device database. Keeps the newest ``retention`` epoch records (the
    secrets needed to decrypt messages of past epochs); older ones are deleted on write.

    The binding calls these methods synchronously during ``write_to_storage``, joins and loads,
    on the caller's thread: they run inside whatever transaction the caller has open."""

    def __init__(self, db: sqlite3.Connection, retention: int = DEFAULT_EPOCH_RETENTION) -> None:
        self.db = db
        self.retention = retention

    def state(self, group_id: bytes) -> bytes | None:
        row = self.db.execute("SELECT state FROM mls_state WHERE group_id=?",
                              (bytes(group_id),)).fetchone()
        return row[0] if row else None

    def epoch(self, group_id: bytes, epoch_id: int) -> bytes | None:
        row = self.db.execute("SELECT data FROM mls_epochs WHERE group_id=? AND epoch_id=?",
                              (bytes(group_id), epoch_id)).fetchone()
        return row[0] if row else None

    def write(self, group_id: bytes, group_state: bytes, epoch_inserts: list[Any],
              epoch_updates: list[Any]) -> None:
        gid = bytes(group_id)
        self.db.execute("INSERT OR REPLACE INTO mls_state VALUES (?,?)", (gid, bytes(group_state)))
        self.db.executemany("INSERT OR REPLACE INTO mls_epochs VALUES (?,?,?)",
                            [(gid, r.id, bytes(r.data)) for r in [*epoch_inserts,
                                                                  *epoch_updates]])
        if not epoch_inserts:
            return  # no new epoch, nothing newly old: most writes (every send and receive)
        top = self.max_epoch_id(gid)
        if top is not None:
            self.db.execute("DELETE FROM mls_epochs WHERE group_id=? AND epoch_id<=?",
                            (gid, top - self.retention))

    def max_epoch_id(self, group_id: bytes) -> int | None:
        row = self.db.execute("SELECT max(epoch_id) FROM mls_epochs WHERE group_id=?",
                              (bytes(group_id),)).fetchone()
        return row[0] if row and row[0] is not None else None


def _config(storage: Any) -> Any:
    return mls_rs_uniffi.ClientConfig(group_state_storage=storage, use_ratchet_tree_extension=True)


def _keypair(public: bytes, secret: bytes) -> Any:
    return mls_rs_uniffi.SignatureKeypair(
        cipher_suite=CIPHER_SUITE, public_key=mls_rs_uniffi.SignaturePublicKey(bytes=public),
        secret_key=mls_rs_uniffi.SignatureSecretKey(bytes=secret))


def new_signature_key() -> tuple[bytes, bytes]:
    """A fresh MLS signature key pair ``(public, secret)``; ``secret[:32]`` is an Ed25519 seed
    (the same key signs manifests, envelopes and syncnode challenges)."""
    key = SecretKey.generate()  # from proto.entropy, like every other key (seedable in simulation)
    return key.public, key.seed + key.public


@functools.lru_cache(maxsize=4096)
def identity_for(sig_pub: bytes) -> Any:
    """The MLS signing identity of the member whose signature key is ``sig_pub`` (cached:
    building it costs a throwaway client, and every received message is checked against it)."""
    dummy = _keypair(sig_pub, bytes(64))
    return mls_rs_uniffi.Client(sig_pub, dummy, _config(_MemoryGroupStorage())).signing_identity()


class MlsClient:
    """This device's MLS client: one signature key, group state in SQLite."""

    def __init__(self, public: bytes, secret: bytes, storage: SqliteGroupStorage) -> None:
        self.public = public
        self.client = mls_rs_uniffi.Client(public, _keypair(public, secret), _config(storage))
        self.identity = self.client.signing_identity()

    def key_package(self) -> bytes:
        """A fresh KeyPackage. Its private part lives only in this process (binding limit)."""
        return bytes(_mls("key package", self.client.generate_key_package_message).to_bytes())

    def create_group(self, group_id: bytes) -> MlsGroup:
        return MlsGroup(_mls("create group", self.client.create_group, group_id))

    def join(self, welcome: bytes) -> MlsGroup:
        msg = _mls("welcome", mls_rs_uniffi.Message.from_bytes, welcome)
        return MlsGroup(_mls("join", self.client.join_group, None, msg).group)

    def load(self, group_id: bytes) -> MlsGroup:
        return MlsGroup(_mls("load group", self.client.load_group, group_id))


class MlsGroup:
    """One MLS group. Commits are built with ``build_*`` (not applied) and applied with
    :meth:`apply_commit` once Paxos decided them."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def build_add(self, key_packages: list[bytes]) -> tuple[bytes, bytes]:
        msgs = [_mls("key package", mls_rs_uniffi.Message.from_bytes, kp) for kp in key_packages]
        out = _mls("add", self.group.add_members, msgs)
        return bytes(out.commit_message.to_bytes()), bytes(out.welcome_message.to_bytes())

    def build_remove(self, sig_pubs: list[bytes]) -> bytes:
        out = _mls("remove", self.group.remove_members, [identity_for(p) for p in sig_pubs])
        return bytes(out.commit_message.to_bytes())

    def build_update(self) -> bytes:
        return bytes(_mls("key update", self.group.commit).commit_message.to_bytes())

    def apply_commit(self, commit: bytes) -> tuple[Any, bool]:
        """Apply a decided commit; returns (committer identity, whether we were removed)."""
        msg = _mls("commit", mls_rs_uniffi.Message.from_bytes, commit)
        received = _mls("commit", self.group.process_incoming_message, msg)
        if not received.is_commit():
            raise MlsError("commit: the decided value is not a commit")
        removed = isinstance(received.effect, mls_rs_uniffi.CommitEffect.REMOVED)
        return received.committer, removed

    def encrypt(self, data: bytes) -> bytes:
        return bytes(_mls("encrypt", self.group.encrypt_application_message, data).to_bytes())

    def decrypt(self, data: bytes) -> tuple[Any, bytes]:
        """Decrypt an application message; returns (sender identity, plaintext)."""
        msg = _mls("message", mls_rs_uniffi.Message.from_bytes, data)
        received = _mls("decrypt", self.group.process_incoming_message, msg)
        if not received.is_application_message():
            raise MlsError("decrypt: not an application message")
        return received.sender, bytes(received.data)

    def export_secret(self, label: bytes, context: bytes, n: int) -> bytes:
        return bytes(_mls("export", self.group.export_secret, label, context, n))

    def persist(self) -> None:
        """Write the group state (and pending commit) through the storage callbacks."""
        _mls("persist", self.group.write_to_storage)


class _MemoryGroupStorage(mls_rs_uniffi.GroupStateStorage):  # type: ignore[misc]
    """Volatile storage, only for the self-check (devices persist to SQLite)."""

    def __init__(self) -> None:
        self.states: dict[bytes, bytes] = {}
        self.epochs: dict[tuple[bytes, int], bytes] = {}

    def state(self, group_id: bytes) -> bytes | None:
        return self.states.get(bytes(group_id))

    def epoch(self, group_id: bytes, epoch_id: int) -> bytes | None:
        return self.epochs.get((bytes(group_id), epoch_id))

    def write(self, group_id: bytes, group_state: bytes, epoch_inserts: list[Any],
              epoch_updates: list[Any]) -> None:
        gid = bytes(group_id)
        self.states[gid] = bytes(group_state)
        for rec in [*epoch_inserts, *epoch_updates]:
            self.epochs[(gid, rec.id)] = bytes(rec.data)

    def max_epoch_id(self, group_id: bytes) -> int | None:
        ids = [e for (g, e) in self.epochs if g == bytes(group_id)]
        return max(ids) if ids else None


def selfcheck(payload: bytes = b"syncnode selfcheck") -> bytes:
    """Create a two-member group, send one encrypted message, return what the receiver read."""

    def client(name: bytes) -> Any:
        keypair = mls_rs_uniffi.generate_signature_keypair(CIPHER_SUITE)
        config = mls_rs_uniffi.ClientConfig(group_state_storage=_MemoryGroupStorage(),
                                            use_ratchet_tree_extension=True)
        return mls_rs_uniffi.Client(name, keypair, config)

    alice, bob = client(b"alice"), client(b"bob")
    group = alice.create_group(b"selfcheck-group")
    commit = group.add_members([bob.generate_key_package_message()])
    group.process_incoming_message(commit.commit_message)
    bob_group = bob.join_group(None, commit.welcome_message).group
    received = bob_group.process_incoming_message(group.encrypt_application_message(payload))
    return bytes(received.data)


class Member:
    """One MLS identity with its signature key usable for manifests and envelopes.

    The MLS signature secret key is ``seed || public``; its seed is an Ed25519 key for pynacl, so
    one key signs MLS handshake messages, manifests, envelopes and syncnode challenges.
    Storage is in memory for now (the device agent's SQLite storage replaces it).
    """

    def __init__(self, name: bytes) -> None:
        from proto.identity import SecretKey

        self._keypair = mls_rs_uniffi.generate_signature_keypair(CIPHER_SUITE)
        self.key = SecretKey(bytes(self._keypair.secret_key.bytes)[:32])
        config = mls_rs_uniffi.ClientConfig(group_state_storage=_MemoryGroupStorage(),
                                            use_ratchet_tree_extension=True)
        self.client = mls_rs_uniffi.Client(name, self._keypair, config)
        self.group: Any = None

    def key_package(self) -> Any:
        return self.client.generate_key_package_message()

    def create_group(self, group_id: bytes) -> None:
        self.group = self.client.create_group(group_id)

    def join(self, welcome: bytes) -> None:
        self.group = self.client.join_group(None, mls_rs_uniffi.Message.from_bytes(welcome)).group

    def add(self, key_packages: list[Any]) -> tuple[bytes, bytes]:
        """Build (not apply) a commit adding members; returns (commit, welcome) bytes."""
        out = self.group.add_members(key_packages)
        return bytes(out.commit_message.to_bytes()), bytes(out.welcome_message.to_bytes())

    def remove(self, members: list[Member]) -> bytes:
        out = self.group.remove_members([m.client.signing_identity() for m in members])
        return bytes(out.commit_message.to_bytes())

    def update(self) -> bytes:
        return bytes(self.group.commit().commit_message.to_bytes())

    def apply(self, commit: bytes) -> None:
        self.group.process_incoming_message(mls_rs_uniffi.Message.from_bytes(commit))

    def encrypt(self, data: bytes) -> bytes:
        return bytes(self.group.encrypt_application_message(data).to_bytes())

    def decrypt(self, data: bytes) -> bytes:
        received = self.group.process_incoming_message(mls_rs_uniffi.Message.from_bytes(data))
        return bytes(received.data)
