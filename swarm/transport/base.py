"""The transport interface: membership records, averaging, and state download.

Implementations: `hivemind_dht.HivemindTransport` (libp2p via hivemind) and `tcp.transport.TcpTransport`
(libp2p-free: TLS channels, gossip records, its own exact butterfly all-reduce and state download);
`factory.make_transport` builds the one `--transport` names. An in-memory one for unit tests can sit
beside them: the training loop sees only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

ABANDONED = "all-reduce abandoned: "  # prefix of the error of an attempt ended by `abandon()`


class TransportError(Exception):
    """A network operation failed (no group, timeout, peer gone): the round can be retried or rolled back."""


@dataclass
class Record:
    owner: str          # peer id of the signer (derived from its public key): nobody else can write it
    value: Any          # msgpack-decoded value, still untrusted: validate before use
    expiration: float   # absolute DHT time


@dataclass
class ReduceResult:
    vector: np.ndarray                   # the averaged vector (float64)
    gathered: dict[str, Any]             # what every group member passed as `gather`, by its (verified) swarm peer id
    seconds: float                       # wall time of matchmaking + all-reduce
    rejections: dict[str, str] = field(default_factory=dict)  # members whose parts this peer's reducer rejected: why
    bytes_sent: int = 0                  # this peer's averaging traffic (framing included), failed attempts of the round too
    bytes_received: int = 0
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # member -> [start, end) of the vector it reduced
    leader: str | None = None            # the member that assembled the group (None: unknown)


StateProvider = Callable[[], tuple[dict, list[np.ndarray]]]


class Transport(Protocol):
    peer_id: str  # this peer's id in records: a hash of its signing key

    def visible_maddrs(self) -> list[str]: ...

    def now(self) -> float:
        """Swarm time (the DHT's clock), for record expirations."""

    def put(self, key: str, value: Any, ttl: float) -> bool:
        """Store this peer's signed value under `key` (one value per peer per key)."""

    def get(self, key: str) -> list[Record]:
        """All live, signature-checked values under `key`, one per owner."""

    def all_reduce(self, vector: np.ndarray, *, group_key: str, group_size: int, gather: Any,
                   timeout: float, wait_until: float | None = None,
                   abandon: Callable[[], str | None] | None = None, allowed: set[str] | None = None) -> ReduceResult:
        """Average `vector` (equal weights) with the peers calling it with the same group_key: wait for
        missing members until `wait_until` (swarm time), at once when `group_size` are there. While no
        group has formed yet, `abandon()` is asked every second: a reason it returns ends the attempt
        (TransportError) without waiting for the deadline. `allowed`: the only peers that may be in the group
        (this round's plan; each must announce `gather["plan"]`): others are refused before any part moves.
        `vector` may instead be a `swarm.codec.Int8Contribution` (averaging.codec int8; tcp only): it is encoded
        with the group's shared scales once the group forms, and the result is read as an exact-codec average."""

    def reducing(self) -> bool:
        """Whether an all-reduce's group has formed and is exchanging parts right now."""

    def ban(self, peer_ids: set[str]) -> None:
        """Refuse to average with these peers (replaces the previous set)."""

    def serve_state(self, provider: StateProvider) -> None:
        """Let joining peers download (metadata, tensors) from this peer."""

    def announce_state_round(self, round_: int) -> None:
        """Tell downloaders the round of the state this peer serves (they ask the newest first)."""

    def download_state(self, timeout: float, min_round: int = 0,
                       skip: set[str] = frozenset()) -> tuple[dict, list[np.ndarray], str] | None:
        """(metadata, tensors, source) from some live peer not distrusted that announced state of round
        `min_round` or later, not one in `skip` (sources as named here), or None when none could serve it
        within `timeout` seconds (the whole download) and the state's size."""

    def distrust(self, source: str) -> None:
        """Never download state from `source` again (its state was rejected)."""

    def shutdown(self) -> None: ...
