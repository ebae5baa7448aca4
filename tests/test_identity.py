from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proto import identity
from proto.errors import KeyFileError, SignatureError
from proto.identity import SecretKey, fingerprint, read_key_file, verify, write_key_file

CTX_A = identity.register_context("syncnode/test/a/v1")
CTX_B = identity.register_context("syncnode/test/b/v1")


def test_sign_verify_and_domain_separation() -> None:
    key = SecretKey.generate()
    sig = key.sign(CTX_A, b"payload")
    verify(key.public, CTX_A, b"payload", sig)
    with pytest.raises(SignatureError):
        verify(key.public, CTX_B, b"payload", sig)  # same bytes, other record type
    with pytest.raises(SignatureError):
        verify(key.public, CTX_A, b"payload!", sig)
    with pytest.raises(SignatureError):
        verify(SecretKey.generate().public, CTX_A, b"payload", sig)
    with pytest.raises(SignatureError):
        verify(key.public, CTX_A, b"payload", sig[:-1])


def test_unregistered_context_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unregistered"):
        SecretKey.generate().sign("syncnode/typo/v1", b"x")
    with pytest.raises(ValueError, match="twice"):
        identity.register_context(CTX_A)


def test_fingerprint_is_stable_and_distinct() -> None:
    a, b = SecretKey.generate(), SecretKey.generate()
    assert fingerprint(a.public) == fingerprint(a.public)
    assert fingerprint(a.public) != fingerprint(b.public)
    assert fingerprint(a.public) != a.public
    assert len(fingerprint(a.public)) == 32


def test_repr_hides_secret() -> None:
    key = SecretKey.generate()
    assert key.seed.hex() not in repr(key)


def test_key_file_round_trip_mode_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "node.key"
    key = SecretKey.generate()
    write_key_file(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path) == key
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_key_file(path, SecretKey.generate())
    assert read_key_file(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temp files left


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    write_key_file(path, SecretKey.generate())
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_key_file(path)


def test_malformed_key_files(tmp_path: Path) -> None:
    path = tmp_path / "k"
    with pytest.raises(KeyFileError, match="does not exist"):
        read_key_file(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key\n")
    os.close(fd)
    with pytest.raises(KeyFileError, match="not a syncnode key"):
        read_key_file(path)


def test_load_or_create(tmp_path: Path) -> None:
    key, created = identity.load_or_create_key(tmp_path / "k")
    assert created
    again, created2 = identity.load_or_create_key(tmp_path / "k")
    assert again == key and not created2


def test_node_id_matches_iroh_endpoint_id() -> None:
    import iroh

    key = SecretKey.generate()
    iroh_key = iroh.SecretKey.from_bytes(key.seed)
    assert bytes(iroh_key.public().to_bytes()) == key.public
    assert str(iroh_key.public()) == identity.node_id_hex(key.public)
    assert identity.parse_node_id(identity.node_id_hex(key.public)) == key.public
    with pytest.raises(ValueError):
        identity.parse_node_id("zz")
