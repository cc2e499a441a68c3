"""Signed, expiring records and the in-memory store every node keeps a full copy of.

A record is one owner's value under one key: (key, owner, value, expiration, signature). The owner
is a peer id, which contains its Ed25519 public key (`identity`), and the signature covers

    msgpack(["swarm-record/1", key, owner, value, expiration])

so nobody but the owner can write its slot, and a record cannot be moved to another key. The value
is the msgpack encoding of what `put` was given; it is checked to decode before it is stored.

Replays: a slot (key, owner) keeps the record with the latest expiration. A record with an earlier or
equal expiration is refused (`STALE`) without checking its signature, a newer one must verify
before it replaces the old. A replayed old record therefore never overwrites a newer one, and it
disappears everywhere when it expires. (As in hivemind, a re-put with a shorter ttl than the
record it would replace is refused too.)

Caps (`Limits`), checked before a record is stored, so a hostile peer cannot grow a node's memory
past them: value size, key length, expiration horizon, records per key (a full key evicts the record
that expires first, if the newcomer outlives it), keys, keys per owner and total value bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import msgpack

from swarm.transport.tcp.identity import Identity, verify

__all__ = ["Limits", "SignedRecord", "RecordStore", "sign", "STALE"]

LABEL = "swarm-record/1"
STALE = "stale"  # refusal reason of a record no newer than the one held: normal in gossip, never a strike


@dataclass(frozen=True)
class Limits:
    max_value_bytes: int = 128 << 10     # one record's encoded value (a run record with its config is ~10 KiB)
    max_records_per_key: int = 512       # owners under one key (hivemind's transport reads at most 512 too)
    max_key_chars: int = 256
    max_keys: int = 4096
    max_keys_per_owner: int = 256
    max_total_bytes: int = 64 << 20      # all values together
    max_ttl: float = 3600.0              # seconds an expiration may lie ahead of this node's clock (skew included)


@dataclass(frozen=True)
class SignedRecord:
    key: str
    owner: str
    value: bytes          # msgpack of the stored value
    expiration: float     # absolute time (the transport's clock)
    signature: bytes

    def to_wire(self) -> list:
        return [self.key, self.owner, self.value, self.expiration, self.signature]

    @classmethod
    def from_wire(cls, item: object) -> "SignedRecord":
        """Shape and type checks only (no signature); ValueError for anything malformed."""
        if not isinstance(item, (list, tuple)) or len(item) != 5:
            raise ValueError("a record is a list of 5 fields")
        key, owner, value, expiration, signature = item
        if isinstance(expiration, int) and not isinstance(expiration, bool):
            expiration = float(expiration)
        if not (isinstance(key, str) and isinstance(owner, str) and isinstance(value, bytes)
                and isinstance(expiration, float) and isinstance(signature, bytes)):
            raise ValueError("a record field has the wrong type")
        if not math.isfinite(expiration):
            raise ValueError("a record's expiration is not finite")
        return cls(key, owner, value, expiration, signature)

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.key, self.owner, self.value, self.expiration)


def signed_bytes(key: str, owner: str, value: bytes, expiration: float) -> bytes:
    return msgpack.packb([LABEL, key, owner, value, float(expiration)], use_bin_type=True)


def sign(identity: Identity, key: str, value: bytes, expiration: float) -> SignedRecord:
    expiration = float(expiration)
    sig = identity.sign(signed_bytes(key, identity.peer_id, value, expiration))
    return SignedRecord(key, identity.peer_id, value, expiration, sig)


def _decodes(value: bytes) -> bool:
    try:
        msgpack.unpackb(value, raw=False, strict_map_key=False, ext_hook=_no_ext)
    except Exception:
        return False
    return True


def _no_ext(code: int, data: bytes):
    raise ValueError("no msgpack extension types in records")


class RecordStore:
    """key -> owner -> SignedRecord. Not thread-safe: the node touches it from its event loop only."""

    def __init__(self, limits: Limits = Limits(), clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self.clock = clock
        self._keys: dict[str, dict[str, SignedRecord]] = {}
        self._owner_keys: dict[str, int] = {}  # owner -> number of keys it holds a record under
        self.total_bytes = 0
        self.refused: dict[str, int] = {}      # reason -> count (what hostile or late peers sent)

    def add(self, rec: SignedRecord) -> str | None:
        """Store `rec`; None when stored (new or newer), else the reason it was refused."""
        why = self._check(rec)
        if why is None:
            self._insert(rec)
        else:
            self.refused[why] = self.refused.get(why, 0) + 1
        return why

    def _check(self, rec: SignedRecord) -> str | None:
        lim, now = self.limits, self.clock()
        if rec.expiration <= now:
            return "expired"
        if rec.expiration > now + lim.max_ttl:
            return "expiration too far ahead"
        if not 0 < len(rec.key) <= lim.max_key_chars:
            return "bad key length"
        if len(rec.value) > lim.max_value_bytes:
            return "value too large"
        slot = self._keys.get(rec.key)
        old = slot.get(rec.owner) if slot is not None else None
        if old is not None and rec.expiration <= old.expiration:
            return STALE
        if not verify(rec.owner, rec.signature, rec.signed_bytes()):
            return "bad signature"
        if not _decodes(rec.value):
            return "value is not msgpack"
        grow = len(rec.value) - (len(old.value) if old is not None else 0)
        if old is None:
            if slot is None and len(self._keys) >= lim.max_keys:
                return "too many keys"
            if self._owner_keys.get(rec.owner, 0) >= lim.max_keys_per_owner:
                return "too many keys for one owner"
            if slot is not None and len(slot) >= lim.max_records_per_key:
                first = min(slot.values(), key=lambda r: r.expiration)
                if first.expiration >= rec.expiration:
                    return "key full"
                grow -= len(first.value)
        if self.total_bytes + grow > lim.max_total_bytes:
            return "store full"
        return None

    def _insert(self, rec: SignedRecord) -> None:
        slot = self._keys.setdefault(rec.key, {})
        old = slot.get(rec.owner)
        if old is None and len(slot) >= self.limits.max_records_per_key:
            self._remove(min(slot.values(), key=lambda r: r.expiration))
        if old is not None:
            self.total_bytes -= len(old.value)
        else:
            self._owner_keys[rec.owner] = self._owner_keys.get(rec.owner, 0) + 1
        slot[rec.owner] = rec
        self.total_bytes += len(rec.value)

    def _remove(self, rec: SignedRecord) -> None:
        slot = self._keys[rec.key]
        del slot[rec.owner]
        if not slot:
            del self._keys[rec.key]
        self.total_bytes -= len(rec.value)
        left = self._owner_keys[rec.owner] - 1
        if left:
            self._owner_keys[rec.owner] = left
        else:
            del self._owner_keys[rec.owner]

    def get(self, key: str) -> list[SignedRecord]:
        """The live records under `key`, one per owner, latest expiration first."""
        now = self.clock()
        live = [r for r in self._keys.get(key, {}).values() if r.expiration > now]
        return sorted(live, key=lambda r: -r.expiration)

    def latest(self, key: str, owner: str) -> SignedRecord | None:
        rec = self._keys.get(key, {}).get(owner)
        return rec if rec is not None and rec.expiration > self.clock() else None

    def records(self) -> Iterator[SignedRecord]:
        """Every live record (a snapshot: safe to iterate while the store changes)."""
        now = self.clock()
        return iter([r for slot in self._keys.values() for r in slot.values() if r.expiration > now])

    def purge(self) -> int:
        """Drop expired records; how many went."""
        now = self.clock()
        dead = [r for slot in self._keys.values() for r in slot.values() if r.expiration <= now]
        for rec in dead:
            self._remove(rec)
        return len(dead)

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._keys.values())
