"""A peer's identity for the TCP transport: an Ed25519 key kept in a file, and the peer id it gives.

Why a file: a restarted peer keeps its id (its records, its place in plans). The file holds the raw
32-byte private key in PEM ("PRIVATE KEY", PKCS#8), is created with mode 0600 and never overwritten.

Peer id: libp2p's format for Ed25519 keys (libp2p/specs peer-ids/peer-ids.md), so it reads like a
libp2p id ("12D3KooW...") and `/p2p/<id>` is a valid multiaddr:

    id = base58btc( 0x00 0x24 | 0x08 0x01 0x12 0x20 | public key (32 bytes) )
         identity multihash (code 0, length 36) of the protobuf PublicKey{Type: Ed25519, Data: key}

The public key is *inside* the id: anyone can check a signature against an id with no lookup, and an
id names exactly one key (`public_key_of` refuses every other byte string).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["Identity", "load_or_create", "peer_id_of_key", "public_key_of", "verify", "b58encode", "b58decode"]

ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])  # identity multihash of a protobuf Ed25519 PublicKey
KEY_BYTES = 32
SIGNATURE_BYTES = 64
_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
MAX_ID_CHARS = 64  # a valid id is 52 characters: anything much longer is refused before decoding


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_ALPHABET[r])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        if c not in _INDEX:
            raise ValueError(f"not base58: {c!r}")
        n = n * 58 + _INDEX[c]
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def peer_id_of_key(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b58encode(ID_PREFIX + raw)


def public_key_of(peer_id: object) -> Ed25519PublicKey:
    """The Ed25519 key named by `peer_id`; ValueError (one line) for anything that is not such an id."""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_ID_CHARS:
        raise ValueError("a peer id is a base58 string of at most 64 characters")
    raw = b58decode(peer_id)
    if len(raw) != len(ID_PREFIX) + KEY_BYTES or not raw.startswith(ID_PREFIX):
        raise ValueError(f"{peer_id} is not an Ed25519 peer id (12D3KooW...)")
    return Ed25519PublicKey.from_public_bytes(raw[len(ID_PREFIX):])


def verify(peer_id: str, signature: object, message: bytes) -> bool:
    """Whether `signature` is `peer_id`'s Ed25519 signature of `message` (False for any malformed input)."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        public_key_of(peer_id).verify(signature, message)
    except (ValueError, InvalidSignature):
        return False
    return True


class Identity:
    """A private key and the peer id it gives."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.public_key = key.public_key()
        self.peer_id = peer_id_of_key(self.public_key)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def to_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def load_or_create(path: Path | None) -> Identity:
    """The identity kept at `path`, created (mode 0600) if the file is missing; a fresh one for None.

    A file that is not an Ed25519 key is a ValueError with one line naming the file: it is never
    replaced, since that would silently change this peer's id.
    """
    if path is None:
        return Identity.generate()
    path = Path(path)
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as e:
            why = getattr(e, "strerror", None) or "not a PEM private key"
            raise ValueError(f"cannot read the identity key {path}: {why} (move it away to make a new identity)") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"the identity key {path} is not an Ed25519 key (move it away to make a new identity)")
        return Identity(key)
    identity = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(identity.to_pem())
    os.replace(tmp, path)
    return identity
