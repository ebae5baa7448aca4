"""Ed25519 identities: node ids, device fingerprints, domain-separated signatures, key files.

* A **syncnode** is identified by its **node id**: the raw 32-byte Ed25519 public key of its iroh
  endpoint key (the same key authenticates its QUIC connections and signs its Paxos replies).
* A **device** is identified by its **fingerprint**: a hash of its MLS signature public key, stable
  across MLS epochs and independent of its (separate) iroh endpoint key.

Every signature covers a *context string* naming the record type (``syncnode/paxos/promise/v1``
...), so a signature made for one kind of record can never be replayed as another. Contexts must
be registered once with :func:`register_context`; signing or verifying under an unregistered
context is a programming error, which catches typos at the first test run.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing

from proto import entropy
from proto.errors import KeyFileError, SignatureError

SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
FINGERPRINT_SIZE = 32

_SIG_DOMAIN = b"syncnode-sig\x00"
_CONTEXTS: set[str] = set()


def register_context(name: str) -> str:
    """Declare a signature context (call at import time of the module that owns the record)."""
    if not name or len(name) > 255 or not name.isascii():
        raise ValueError(f"bad signature context {name!r}")
    if name in _CONTEXTS:
        raise ValueError(f"signature context {name!r} registered twice")
    _CONTEXTS.add(name)
    return name


def _signed_bytes(context: str, payload: bytes) -> bytes:
    if context not in _CONTEXTS:
        raise ValueError(f"unregistered signature context {context!r}")
    ctx = context.encode("ascii")
    return _SIG_DOMAIN + bytes([len(ctx)]) + ctx + payload


@dataclass(frozen=True, repr=False)
class SecretKey:
    """An Ed25519 secret key (its 32-byte seed). ``repr`` never shows the secret."""

    seed: bytes
    _public: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_SIZE:
            raise ValueError(f"Ed25519 seed must be {SEED_SIZE} bytes, got {len(self.seed)}")
        object.__setattr__(self, "_public",
                           bytes(nacl.signing.SigningKey(self.seed).verify_key))

    @classmethod
    def generate(cls) -> SecretKey:
        return cls(entropy.token_bytes(SEED_SIZE))

    @property
    def public(self) -> bytes:
        """The 32-byte public key (a syncnode's node id, an iroh endpoint id)."""
        return self._public

    def sign(self, context: str, payload: bytes) -> bytes:
        """Sign ``payload`` under ``context``; returns the 64-byte signature."""
        return _ed25519_sign(self.seed + self._public, _signed_bytes(context, payload))

    def __repr__(self) -> str:
        return f"SecretKey(public={short_id(self.public)})"


def verify(public_key: bytes, context: str, payload: bytes, signature: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``public_key``'s over the payload."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise SignatureError("malformed key or signature length")
    if not _ed25519_verify(public_key, _signed_bytes(context, payload), signature):
        raise SignatureError(f"bad signature for context {context!r}")


# The two Ed25519 primitives, as module-level functions so the state-space explorer can wrap
# them in a memo (Ed25519 is deterministic, so memoising changes no result, only speed).


# Straight to libsodium: ``nacl.signing.SigningKey(seed)`` derives the key pair again at every
# call (a third of a syncnode's signing cost), so the key holds seed + public key (libsodium's
# 64-byte secret key form) and signs with it directly.


def _ed25519_sign(secret: bytes, message: bytes) -> bytes:
    """``secret`` is seed + public key (64 bytes)."""
    return bytes(nacl.bindings.crypto_sign(message, secret)[:SIGNATURE_SIZE])


def _ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.bindings.crypto_sign_open(signature + message, public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError):
        return False
    return True


def is_valid_signature(public_key: bytes, context: str, payload: bytes, signature: bytes) -> bool:
    try:
        verify(public_key, context, payload, signature)
    except SignatureError:
        return False
    return True


def fingerprint(sig_public_key: bytes) -> bytes:
    """A device's fingerprint: BLAKE2b-256 of its MLS signature public key, personalised."""
    if len(sig_public_key) != PUBLIC_KEY_SIZE:
        raise ValueError("signature public key must be 32 bytes")
    return hashlib.blake2b(sig_public_key, digest_size=FINGERPRINT_SIZE,
                           person=b"syncnode-fpr-v1").digest()


def node_id_hex(public_key: bytes) -> str:
    """The text form of a node id / endpoint id (lowercase hex, as iroh prints it)."""
    return public_key.hex()


def parse_node_id(text: str) -> bytes:
    """Parse a node id from its hex form; raises ValueError with a readable message."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"node id {text[:20]!r}... is not hex") from None
    if len(raw) != PUBLIC_KEY_SIZE:
        raise ValueError(f"node id must be {PUBLIC_KEY_SIZE} bytes, got {len(raw)}")
    return raw


def short_id(raw: bytes) -> str:
    """First 5 bytes in hex: enough to tell peers apart in logs."""
    return raw[:5].hex()


# ---------------------------------------------------------------------------------------------
# Key files
# ---------------------------------------------------------------------------------------------

_KEY_MAGIC = "syncnode-ed25519-secret-v1"


def write_key_file(path: Path, key: SecretKey, *, overwrite: bool = False) -> None:
    """Write ``key`` to ``path`` atomically with mode 0600.

    The key is written to a temporary file in the same directory, fsynced, then linked into place
    (``overwrite=False``: fails if ``path`` exists, atomically) or renamed over it. A crash at
    any point leaves either no key file or a complete one, never a truncated key.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.tmp-{secrets.token_hex(6)}"
    body = f"{_KEY_MAGIC}\n{key.seed.hex()}\n".encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    finally:
        tmp.unlink(missing_ok=True)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_key_file(path: Path) -> SecretKey:
    """Load a key written by :func:`write_key_file`; refuses files others can read or write."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be accessible "
            f"to group or others (run: chmod 600 {path})"
        )
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KeyFileError(f"key file {path} is owned by uid {st.st_uid}, not by us")
    lines = path.read_text(encoding="ascii", errors="replace").split("\n")
    if len(lines) < 2 or lines[0] != _KEY_MAGIC:
        raise KeyFileError(f"{path} is not a syncnode key file")
    try:
        seed = bytes.fromhex(lines[1])
        return SecretKey(seed)
    except ValueError:
        raise KeyFileError(f"{path}: malformed key") from None


def load_or_create_key(path: Path) -> tuple[SecretKey, bool]:
    """The key at ``path``, generating and storing one first if there is none.

    Returns ``(key, created)``.
    """
    path = Path(path)
    if path.exists():
        return read_key_file(path), False
    key = SecretKey.generate()
    try:
        write_key_file(path, key)
    except KeyFileError:  # lost a race with another process creating it: use theirs
        return read_key_file(path), False
    return key, True
