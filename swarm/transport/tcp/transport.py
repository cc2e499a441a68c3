"""`TcpTransport`: the `Transport` protocol (swarm/transport/base.py) over the TCP gossip node.

Membership records (`put`/`get`) on the gossip node (`node`), matchmaking and the exact butterfly
all-reduce (`group`, `allreduce`), and state download (`state`).

Values are msgpack-encoded, as with hivemind (tuples come back as lists); `get` returns one
validated `Record` per owner. Time is this machine's clock (`now`): records carry absolute
expirations, so peers' clocks must roughly agree (records further ahead than
`Limits.max_ttl` are refused).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np

from swarm import SwarmError
from swarm.key import SwarmKey
from swarm.transport.base import Record, ReduceResult, StateProvider
from swarm.transport.tcp.channel import ChannelError
from swarm.transport.tcp.group import Averager
from swarm.transport.tcp.identity import load_or_create
from swarm.transport.tcp.node import TcpNode
from swarm.transport.tcp.records import STALE, Limits
from swarm.transport.tcp.state import StateService

__all__ = ["TcpTransport"]

log = logging.getLogger("swarm.transport.tcp")

IDENTITY_FILE = "identity.ed25519"  # in --output, beside hivemind's identity.key (another key type)


class TcpTransport:
    """Records over the TCP transport. `identity`: the key file (None: a new id every run)."""

    def __init__(self, *, host: str = "0.0.0.0", port: int = 0, initial_peers: list[str] | None = None,
                 identity: Path | None = None, swarm_key: SwarmKey | None = None,
                 announce: list[str] | None = None, limits: Limits = Limits(), **node_options: Any) -> None:
        try:
            me = load_or_create(identity)
        except (ValueError, OSError) as e:
            raise SwarmError(str(e)) from None
        self.swarm_key = swarm_key
        try:
            node_options.setdefault("dial_from_listen", bool(announce))  # a relay/NAT in front: dial from the listen port
            self.node = TcpNode(me, host=host, port=port, initial_peers=initial_peers, swarm_key=swarm_key,
                                announce=announce, limits=limits, clock=self.now, **node_options)
        except ValueError as e:  # a bad address in --initial-peers or --announce
            raise SwarmError(str(e)) from None
        except ChannelError as e:
            raise SwarmError(str(e)) from None
        except OSError as e:
            if getattr(e, "errno", None) in (48, 98, 10048):  # EADDRINUSE on macOS, Linux, Windows
                raise SwarmError(f"port {port} on {host} is already in use: pick another --port or leave it out") from None
            raise SwarmError(f"could not listen on {host}:{port}: {e.strerror or e}") from None
        self.peer_id = me.peer_id
        self._state = StateService(self.node, self.get)
        self._averager = Averager(self.node, me, swarm_key, clock=self.now)

    # --- records ---------------------------------------------------------------------------
    def visible_maddrs(self) -> list[str]:
        return self.node.visible_maddrs()

    def now(self) -> float:
        return time.time()

    def put(self, key: str, value: Any, ttl: float) -> bool:
        """Store this peer's value under `key` and spread it; False if refused (too big, or not newer)."""
        data = msgpack.packb(value, use_bin_type=True)
        why = self.node.put_why(key, data, self.now() + ttl)
        if why not in (None, STALE):
            log.warning("record under %s not stored: %s", key, why)
        return why is None

    def get(self, key: str) -> list[Record]:
        out = []
        for rec in self.node.get(key):
            try:
                value = msgpack.unpackb(rec.value, raw=False, strict_map_key=False)
            except Exception:  # the store checked it decodes: not reached
                continue
            out.append(Record(owner=rec.owner, value=value, expiration=rec.expiration))
        return out

    def peers(self) -> list[str]:
        """Peer ids connected right now (not in the protocol; for status and tests)."""
        return self.node.peers()

    def shutdown(self) -> None:
        self.node.shutdown()

    # --- averaging (swarm/transport/tcp/group.py, allreduce.py) ------------------------------------
    def open_averaging(self, *, run: str, vector_size: int, matchmaking_time: float = 5.0, allreduce_timeout: float = 60.0,
                       clip_norm: float = 1.0, max_norm_ratio: float | None = None, chunk_timeout: float = 5.0,
                       codec: str = "exact") -> None:
        """The reducers' checks (clip bound, norm ratio), the vector length, the wire codec (`averaging.codec`,
        swarm.codec: with int8, `all_reduce` takes an `Int8Contribution`), the stall limit of every all-reduce and
        the bound of its exchange once the group has formed (`allreduce_timeout`; `all_reduce`'s own `timeout` bounds
        the wait for the group); the state announcements of this run, and the state's size cap."""
        self._state.open(run, vector_size)
        self._averager.configure(vector_size=vector_size, clip_norm=clip_norm, max_norm_ratio=max_norm_ratio,
                                 chunk_timeout=chunk_timeout, codec=codec, allreduce_timeout=allreduce_timeout)

    def all_reduce(self, vector: np.ndarray, *, group_key: str, group_size: int, gather: Any, timeout: float,
                   wait_until: float | None = None, abandon: Callable[[], str | None] | None = None,
                   allowed: set[str] | None = None) -> ReduceResult:
        return self._averager.all_reduce(vector, group_key=group_key, group_size=group_size, gather=gather,
                                         timeout=timeout, wait_until=wait_until, abandon=abandon, allowed=allowed)

    def reducing(self) -> bool:
        return self._averager.reducing()

    def ban(self, peer_ids: set[str]) -> None:
        """Refuse to average with these peers (as leader, follower or fellow member), or download state from them,
        until the next call."""
        self._averager.banned = frozenset(peer_ids)
        self._state.banned = set(peer_ids)

    # --- state (`state.StateService`) -------------------------------------------------------
    def serve_state(self, provider: StateProvider) -> None:
        self._state.serve(provider)

    def announce_state_round(self, round_: int) -> None:
        self._state.announce(round_)

    def download_state(self, timeout: float, min_round: int = 0, skip: set[str] = frozenset()):
        return self._state.download(timeout, min_round=min_round, skip=skip)

    def distrust(self, source: str) -> None:
        self._state.distrust(source)

