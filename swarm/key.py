"""Swarm keys: what makes a swarm private.

Why: without a secret, anyone who learns one multiaddr is a full member (an identity costs one RSA
key). A swarm key is 32 random bytes shared out of band (a file, mode 0600). Peers started with the
same `--swarm-key FILE` append an HMAC-SHA256 with that key to every DHT record they store and to
their signed group announcement; peers refuse (DHT storage, DHT reads, group admission) whatever
does not carry a valid one. No key: an open swarm, as before.

    python -m swarm.key FILE     # create a new key (refuses to overwrite one)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from swarm import SwarmError

KEY_BYTES = 32
HEADER = "swarm-key-v1 "


@dataclass(frozen=True)
class SwarmKey:
    secret: bytes

    @property
    def id(self) -> str:
        """A short public name of the key (safe to print): peers with different keys see different ids."""
        return hashlib.sha256(b"swarm-key-id|" + self.secret).hexdigest()[:12]

    def mac(self, *parts: bytes) -> bytes:
        msg = b"".join(len(p).to_bytes(8, "big") + p for p in parts)  # length-prefixed: no ambiguity
        return hmac.new(self.secret, msg, hashlib.sha256).digest()

    def check(self, tag: object, *parts: bytes) -> bool:
        return isinstance(tag, bytes) and hmac.compare_digest(tag, self.mac(*parts))


def create(path: Path) -> SwarmKey:
    if path.exists():
        raise SwarmError(f"{path} already exists: a swarm key is never overwritten (remove it first)")
    key = SwarmKey(secrets.token_bytes(KEY_BYTES))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(HEADER + key.secret.hex() + "\n")
    return key


def load(path: Path) -> SwarmKey:
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SwarmError(f"cannot read swarm key {path}: {getattr(e, 'strerror', None) or e}") from None
    if not text.startswith(HEADER):
        raise SwarmError(f"{path} is not a swarm key (create one with: python -m swarm.key FILE)")
    try:
        secret = bytes.fromhex(text[len(HEADER):])
    except ValueError:
        secret = b""
    if len(secret) != KEY_BYTES:
        raise SwarmError(f"{path} is not a swarm key: expected {KEY_BYTES} hex-encoded bytes")
    return SwarmKey(secret)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m swarm.key FILE   (creates a new swarm key in FILE)", file=sys.stderr)
        return 2
    try:
        key = create(Path(argv[0]))
    except (SwarmError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"swarm key {key.id} written to {argv[0]}: give it (privately) to every peer, with --swarm-key {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
