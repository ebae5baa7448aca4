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
