"""The MLS adapter: the only module that imports the ``mls_rs_uniffi`` binding.

For now it loads and patches the binding (the per-byte buffer copy fix, after checking the
generated names it relies on) and offers :func:`selfcheck`. The group-state storage, commit and
application-message API of the device agent grow here (issue: device agent).
"""

from __future__ import annotations

from typing import Any

import mls_rs_uniffi
import mls_rs_uniffi.mls_rs_uniffi as _generated

from proto.transport.uniffi_trio import patch_module

patch_module(_generated, async_api=False)

CIPHER_SUITE = mls_rs_uniffi.CipherSuite.CURVE25519_AES128


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
