"""The hivemind transport: DHT records signed per peer, decentralized all-reduce, state download.

This module, `hivemind_averager` (hivemind's averager, hardened for untrusted peers) and
`hivemind_traffic` (its byte counters) are the only modules of swarm that import hivemind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import hivemind
from hivemind.averaging.control import AveragingStage
from hivemind.compression import NoCompression
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import ValueWithExpiration

from swarm import SwarmError
from swarm.key import SwarmKey
from swarm.transport.base import ABANDONED, Record, ReduceResult, StateProvider, TransportError
from swarm.transport.chaos import die_when_serving
from swarm.transport.hivemind_averager import (MAX_MESSAGE_BYTES, SwarmAverager, _proof_parts, member_proof, owner_of,
                                               signed_owner)

__all__ = ["HivemindTransport", "MAX_MESSAGE_BYTES", "load_identity", "owner_of", "peer_id_of"]

ALL_INTERFACES = ("0.0.0.0", "::")
GROUP_BITS = 16
ABANDON_POLL = 1.0  # seconds between asks whether to stop looking for a group
STATE_META_BYTES = 4 << 20  # a state's metadata and serialization overhead, at most
MAX_RECORDS = 512          # values read under one DHT key, at most (the newest); more is not a swarm but an attack
MAX_RECORD_BYTES = 128 << 10  # one value's serialized size, at most (a run record with its model config is ~10 KiB)


def route_hivemind_logs(log_file: Path | None) -> None:
    """hivemind logs every matchmaking hiccup (with tracebacks): send it to a file, never to the console.

    Touches only the "hivemind" and "asyncio" loggers, never the root logger.
    """
    hivemind.utils.logging.use_hivemind_log_handler("nowhere")
    from swarm.logs import log_handler

    handler = logging.NullHandler() if log_file is None else log_handler(log_file)
    # asyncio: hivemind's processes leave "Future exception was never retrieved" tracebacks when a peer dies
    for name in ("hivemind", "asyncio"):
        lg = logging.getLogger(name)
        lg.propagate = False
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.addHandler(handler)
        lg.setLevel(logging.INFO if name == "hivemind" else logging.WARNING)


def load_identity(path: Path | None) -> RSAPrivateKey:
    """This peer's signing key, kept in `--output` so a restarted peer keeps its id."""
    from cryptography.hazmat.primitives import serialization

    if path is not None and path.is_file():
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key._private_key = serialization.load_der_private_key(path.read_bytes(), password=None)
        return key
    key = RSAPrivateKey()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(key.to_bytes())
        os.chmod(tmp, 0o600)
        tmp.replace(path)
    return key


def peer_id_of(identity: Path) -> str:
    """The swarm peer id of the signing key kept at `identity` (a peer's `--output`/identity.key)."""
    return owner_of(RSASignatureValidator(load_identity(identity)).local_public_key)


class SwarmKeyValidator(RecordValidatorBase):
    """Private swarms (`swarm.key`): every DHT value carries an HMAC, with the swarm key, of its key,
    subkey, value (RSA signature included) and expiration. hivemind calls `validate` when another node
    asks to store a record and on every record another node returns: a non-member can neither store
    in members' nodes nor have what it serves read. Covers hivemind's own averager records too."""

    _RE = re.compile(rb"\[swarm-hmac:([0-9a-f]{64})\]$")

    def __init__(self, key: SwarmKey) -> None:
        self.key = key

    def _tag(self, record: DHTRecord, value: bytes) -> bytes:
        return self.key.mac(record.key, record.subkey, value, repr(float(record.expiration_time)).encode())

    def validate(self, record: DHTRecord) -> bool:
        m = self._RE.search(record.value)
        return m is not None and self.key.check(bytes.fromhex(m.group(1).decode()), *self._parts(record))

    def _parts(self, record: DHTRecord):
        return (record.key, record.subkey, self.strip_value(record), repr(float(record.expiration_time)).encode())

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + b"[swarm-hmac:" + self._tag(record, record.value).hex().encode() + b"]"

    def strip_value(self, record: DHTRecord) -> bytes:
        return self._RE.sub(b"", record.value)

    @property
    def priority(self) -> int:
        return 100  # signs last (over the RSA signature), validates first


class HivemindTransport:
    """DHT membership starts at construction; averaging opens once the run (and so the vector size) is known."""

    def __init__(self, *, host: str = "0.0.0.0", port: int = 0, initial_peers: list[str] | None = None,
                 identity: Path | None = None, client_mode: bool = False, log_file: Path | None = None,
                 swarm_key: SwarmKey | None = None, announce: list[str] | None = None) -> None:
        from swarm.lifecycle import guard

        guard()  # hivemind's DHT, averager and p2pd end with this process, however it ends
        route_hivemind_logs(log_file)
        self._key = load_identity(identity)
        self._signer = RSASignatureValidator(self._key)
        self.peer_id = owner_of(self._signer.local_public_key)
        self.swarm_key = swarm_key  # None: an open swarm
        validators = [self._signer] + ([SwarmKeyValidator(swarm_key)] if swarm_key is not None else [])
        self._lock = threading.Lock()  # DHT calls come from the loop and the advertiser thread
        self._averager: SwarmAverager | None = None
        self._group_size = 0
        loopback = host.startswith("127.") or host in ("localhost", "::1")
        ip = "ip6" if ":" in host else "ip4"
        try:
            self.dht = hivemind.DHT(
                initial_peers=initial_peers or None, start=True, record_validators=validators,
                host_maddrs=[f"/{ip}/{host}/tcp/{port}"], announce_maddrs=announce or None, nat_port_map=not loopback,
                use_relay=not loopback, auto_nat=not loopback, startup_timeout=30, client_mode=client_mode,
            )
        except Exception as e:  # p2pd's errors are long; the first line says what went wrong
            text = str(e).strip()
            msg = text.splitlines()[0] if text else type(e).__name__
            msg = re.sub(r"^Daemon failed to start: (\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?", "", msg)
            if "address already in use" in text.lower():
                raise SwarmError(f"port {port} on {host} is already in use: pick another --port or leave it out") from None
            if initial_peers:
                raise SwarmError(f"could not reach any peer of --initial-peers {' '.join(initial_peers)}: {msg}") from None
            raise SwarmError(f"could not start the DHT on {host}:{port}: {msg}") from None

    def open_averaging(self, *, run: str, vector_size: int, matchmaking_time: float, allreduce_timeout: float,
                       clip_norm: float = 1.0, max_norm_ratio: float | None = None, chunk_timeout: float = 5.0,
                       codec: str = "exact") -> None:
        from swarm.codec import transport_refusal

        why = transport_refusal(codec, "hivemind")
        if why:
            raise SwarmError(why)
        self._averager = SwarmAverager(
            [torch.zeros(vector_size, dtype=torch.float64)], self.dht, start=False, prefix=f"{run}_avg",
            target_group_size=2, min_group_size=2, min_matchmaking_time=matchmaking_time,
            request_timeout=matchmaking_time / 2, allreduce_timeout=allreduce_timeout,
            # a member that dies mid all-reduce may leave its streams open (libp2p does not always see it go):
            # without these, the others would wait for its parts until allreduce_timeout
            sender_timeout=chunk_timeout, reducer_timeout=2 * chunk_timeout, next_chunk_timeout=2 * chunk_timeout,
            compression=NoCompression(), state_compression=NoCompression(), allow_state_sharing=True,
            declare_state_period=10, shutdown_timeout=3,
        )
        # reducers check every sender against these (set before the averager's process forks)
        self._averager.clip_norm, self._averager.max_norm_ratio = clip_norm, max_norm_ratio
        self._averager.swarm_key = self.swarm_key  # refuses non-members in matchmaking and state download
        self._averager.run_in_background(await_ready=True)
        self._group_size = 2
        self._traffic = (0, 0)  # averaging bytes (sent, received) not yet reported in a ReduceResult
        self._vector_size = vector_size
        self._p2p_of: dict[str, str] = {}  # swarm peer id -> libp2p peer id, learned from signed gathers
        self._banned: set[str] = set()

    # --- records ---------------------------------------------------------------------------
    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def now(self) -> float:
        return hivemind.utils.get_dht_time()

    def put(self, key: str, value: Any, ttl: float) -> bool:
        with self._lock:
            return bool(self.dht.store(key, value, expiration_time=self.now() + ttl, subkey=self._signer.local_public_key))

    def get(self, key: str) -> list[Record]:
        with self._lock:
            found = self.dht.get(key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        items = [(subkey, item) for subkey, item in found.value.items()
                 if isinstance(subkey, bytes) and isinstance(item, ValueWithExpiration)
                 and subkey.startswith(b"[owner:")]  # only signed records: an unsigned one has no owner
        if len(items) > MAX_RECORDS:
            logging.getLogger("swarm.transport").warning("key %s holds %d records: reading the newest %d", key, len(items),
                                                         MAX_RECORDS)
            items = sorted(items, key=lambda kv: -float(kv[1].expiration_time))[:MAX_RECORDS]
        out = []
        for subkey, item in items:
            try:
                size = len(MSGPackSerializer.dumps(item.value))
            except Exception:
                continue
            if size > MAX_RECORD_BYTES:
                logging.getLogger("swarm.transport").warning("dropped a %d-byte record under %s from %s (limit %d)",
                                                             size, key, owner_of(subkey), MAX_RECORD_BYTES)
                continue
            out.append(Record(owner=owner_of(subkey), value=item.value, expiration=float(item.expiration_time)))
        return out

    # --- averaging -------------------------------------------------------------------------
    def all_reduce(self, vector: np.ndarray, *, group_key: str, group_size: int, gather: Any,
                   timeout: float, wait_until: float | None = None,
                   abandon: Callable[[], str | None] | None = None, allowed: set[str] | None = None) -> ReduceResult:
        start = time.perf_counter()
        if allowed is not None:  # this round's plan: nobody else is admitted (as follower or leader)
            self._averager._call("_set_round", sorted(allowed | {self.peer_id}), gather.get("plan"), group_key)
        # matchmaking waits for missing members until `wait_until` (the round's deadline, DHT time);
        # the group forms at once when all `group_size` members are there
        now = self.now()
        scheduled = max(wait_until or 0.0, now + 0.5)
        bits = format(int(hashlib.sha256(group_key.encode()).hexdigest(), 16) % (1 << GROUP_BITS), f"0{GROUP_BITS}b")
        self._averager.set_group_bits(bits)
        if group_size != self._group_size:
            self._averager.set_target_group_size(max(2, group_size))
            self._group_size = group_size
        with self._averager.get_tensors() as tensors:
            tensors[0].copy_(torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float64)))
        signed = self._sign(gather, group_key)
        try:
            self._control = self._averager.step(gather=signed, weight=1.0, scheduled_time=scheduled,
                                                timeout=max(timeout, scheduled - now + 1.0), allow_retries=True, wait=False)
            gathered = self._await_step(self._control, abandon)
        except TransportError:
            raise
        except Exception as e:
            raise TransportError(f"all-reduce failed: {type(e).__name__}: {e}") from None
        finally:
            report = self._averager._call("_take_rejections")
            rejections = report.get("rejections", {})
            sent, received = self._averager._call("_take_traffic")  # failed attempts count in the next result
            self._traffic = (self._traffic[0] + sent, self._traffic[1] + received)
        if not gathered:
            raise TransportError("all-reduce failed: no group formed before the deadline")
        with self._averager.get_tensors() as tensors:
            result = tensors[0].numpy().copy()
        members, forged = {}, []
        for p2p_id, wrapper in gathered.items():
            owner = self._verify(wrapper, str(p2p_id), group_key)
            if owner is None or owner in members:
                forged.append(str(p2p_id))
                continue
            members[owner] = wrapper["g"]
            self._p2p_of[owner] = str(p2p_id)
        if forged:  # not banned: the group's leader relays every announcement, so it may be the leader's doing
            raise TransportError(f"all-reduce failed: the announcement of member(s) {', '.join(forged)} is not signed "
                                 "by a swarm key for their libp2p id (or names a peer twice)")
        by_owner = {owner: rejections[p2p] for owner, p2p in self._p2p_of.items() if p2p in rejections}
        (sent, received), self._traffic = self._traffic, (0, 0)
        owners = {self._p2p_of[o]: o for o in members}
        spans = {owners[p]: (a, b) for p, a, b in report.get("spans", ()) if p in owners}
        leader = report.get("leader")
        return ReduceResult(vector=result, gathered=members, seconds=time.perf_counter() - start, rejections=by_owner,
                            bytes_sent=sent, bytes_received=received, spans=spans, leader=owners.get(leader, leader))

    def reducing(self) -> bool:
        control = getattr(self, "_control", None)
        return control is not None and not control.done() and control.stage == AveragingStage.RUNNING_ALLREDUCE

    @staticmethod
    def _await_step(control, abandon: Callable[[], str | None] | None):
        """The step's gathered data; while it is still looking for a group, end it if `abandon()` gives a reason
        (hivemind cancels matchmaking cleanly; once the all-reduce runs, it is never cancelled)."""
        while True:
            try:
                return control.result(timeout=ABANDON_POLL)
            except FutureTimeout:
                pass
            if abandon is None or control.stage != AveragingStage.LOOKING_FOR_GROUP:
                continue
            why = abandon()
            if why and control.stage == AveragingStage.LOOKING_FOR_GROUP and control.cancel():
                raise TransportError(ABANDONED + why)

    def _sign(self, gather: Any, group_key: str) -> dict:
        """Bind this peer's announcement to its swarm id (its RSA key) and its libp2p id, for this group only."""
        me = self.dht.peer_id.to_base58().encode()
        body = MSGPackSerializer.dumps(gather) + b"|" + me + b"|" + group_key.encode()
        signed = {"g": gather, "k": self._signer.local_public_key, "s": self._key.sign(body)}
        if getattr(self, "swarm_key", None) is not None:  # membership proof, checked by the averager before any part moves
            signed["h"] = member_proof(self.swarm_key, signed, me)
        return signed

    def _verify(self, wrapper: Any, p2p_id: str, group_key: str) -> str | None:
        """The swarm id that signed this member's announcement for its own libp2p id, or None."""
        try:
            if getattr(self, "swarm_key", None) is not None and not self.swarm_key.check(
                    wrapper.get("h"), *_proof_parts(wrapper, p2p_id.encode())):
                return None
        except Exception:
            return None
        return signed_owner(wrapper, p2p_id, group_key)

    def ban(self, peer_ids: set[str]) -> None:
        """Refuse these swarm peers in matchmaking (as leader and as follower) until the next call."""
        wanted = {self._p2p_of[p] for p in peer_ids if p in self._p2p_of}
        if wanted != self._banned:
            self._banned = wanted
            self._averager._call("_set_banned", sorted(wanted))

    # --- state -----------------------------------------------------------------------------
    def serve_state(self, provider: StateProvider) -> None:
        # fault injection (swarm.transport.chaos): the one peer that takes the flag file dies (its main process
        provider = die_when_serving(provider)  # only) as it serves a state download
        self._averager.state_provider = provider

    def announce_state_round(self, round_: int) -> None:
        self._averager.state_sharing_priority = float(round_)  # downloaders ask the newest state first

    def download_state(self, timeout: float, min_round: int = 0,
                       skip: set[str] = frozenset()) -> tuple[dict, list[np.ndarray], str] | None:
        # the state is the adapter and two optimizer moments (float32) plus metadata: nothing bigger is a state
        max_bytes = 3 * 4 * self._vector_size + STATE_META_BYTES
        try:
            got = self._averager.load_state_from_peers(timeout=timeout, min_priority=float(min_round),
                                                       skip=tuple(skip), max_bytes=max_bytes,
                                                       first=tuple(self._p2p_of.values()))  # peers met in signed groups
        except Exception:
            return None
        if not got:
            return None
        meta, tensors, source = got
        return meta, [t.numpy() for t in tensors], source

    def distrust(self, source: str) -> None:
        """Never download state from this source (as `download_state` named it) again."""
        self._averager._call("_distrust", source)

    def shutdown(self) -> None:
        for part in (self._averager, self.dht):
            try:
                if part is not None and part.is_alive():
                    part.shutdown()
            except Exception:
                pass
