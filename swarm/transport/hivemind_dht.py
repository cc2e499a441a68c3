"""The hivemind transport: DHT records signed per peer, decentralized all-reduce, state download.

This is the only module of swarm that imports hivemind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hivemind
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import NoCompression
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import ValueWithExpiration

from swarm import SwarmError
from swarm.transport.base import Record, ReduceResult, StateProvider, TransportError

ALL_INTERFACES = ("0.0.0.0", "::")
GROUP_BITS = 16


def route_hivemind_logs(log_file: Path | None) -> None:
    """hivemind logs every matchmaking hiccup (with tracebacks): send it to a file, never to the console.

    Touches only the "hivemind" logger, never the root logger.
    """
    hivemind.utils.logging.use_hivemind_log_handler("nowhere")
    lg = logging.getLogger("hivemind")
    lg.propagate = False
    for h in list(lg.handlers):
        lg.removeHandler(h)
    if log_file is None:
        lg.addHandler(logging.NullHandler())
        return
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)


def owner_of(public_key_marker: bytes) -> str:
    """A peer's id in swarm records: a short hash of its RSA public key (so it can't be claimed by others)."""
    return hashlib.sha256(public_key_marker).hexdigest()[:16]


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


class _Averager(DecentralizedAverager):
    """A DecentralizedAverager whose group size can follow the round plan and whose state is ours."""

    state_provider: StateProvider | None = None

    def run(self) -> None:
        # a dying p2pd (Ctrl-C reaches the whole process group) makes hivemind's shutdown raise in a
        # thread: log it with hivemind's messages instead of printing a traceback on the console
        threading.excepthook = lambda a: logging.getLogger("hivemind").warning(
            "averager thread ended: %s: %s", a.exc_type.__name__, a.exc_value)
        # hivemind's reducer sums parts in `torch.zeros(shape)`, i.e. the default dtype: float32
        # would truncate our exact float64 fixed-point sums. This runs in the averager's own process.
        torch.set_default_dtype(torch.float64)
        super().run()

    def get_current_state(self):
        if self.state_provider is None:
            return None, [], None
        meta, arrays = self.state_provider()
        return meta, [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays], None

    async def _set_target_group_size(self, size: int, future) -> None:
        mm = self._matchmaking
        mm.target_group_size = mm.potential_leaders.target_group_size = mm.group_key_manager.target_group_size = size
        future.set_result(True)

    def set_target_group_size(self, size: int) -> None:
        from hivemind.utils.mpfuture import MPFuture

        future = MPFuture()
        self._outer_pipe.send(("_set_target_group_size", [size], dict(future=future)))
        future.result(timeout=10)


class HivemindTransport:
    """DHT membership starts at construction; averaging opens once the run (and so the vector size) is known."""

    def __init__(self, *, host: str = "0.0.0.0", port: int = 0, initial_peers: list[str] | None = None,
                 identity: Path | None = None, client_mode: bool = False, log_file: Path | None = None) -> None:
        route_hivemind_logs(log_file)
        self._key = load_identity(identity)
        self._signer = RSASignatureValidator(self._key)
        self.peer_id = owner_of(self._signer.local_public_key)
        self._lock = threading.Lock()  # DHT calls come from the loop and the advertiser thread
        self._averager: _Averager | None = None
        self._group_size = 0
        loopback = host.startswith("127.") or host in ("localhost", "::1")
        ip = "ip6" if ":" in host else "ip4"
        try:
            self.dht = hivemind.DHT(
                initial_peers=initial_peers or None, start=True, record_validators=[self._signer],
                host_maddrs=[f"/{ip}/{host}/tcp/{port}"], nat_port_map=not loopback,
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

    def open_averaging(self, *, run: str, vector_size: int, matchmaking_time: float, allreduce_timeout: float) -> None:
        self._averager = _Averager(
            [torch.zeros(vector_size, dtype=torch.float64)], self.dht, start=True, prefix=f"{run}_avg",
            target_group_size=2, min_group_size=2, min_matchmaking_time=matchmaking_time,
            request_timeout=matchmaking_time / 2, allreduce_timeout=allreduce_timeout,
            compression=NoCompression(), state_compression=NoCompression(), allow_state_sharing=True,
            declare_state_period=10, shutdown_timeout=3,
        )
        self._group_size = 2

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
        out = []
        for subkey, item in found.value.items():
            if not isinstance(subkey, bytes) or not isinstance(item, ValueWithExpiration):
                continue
            if not subkey.startswith(b"[owner:"):  # only signed records: an unsigned one has no owner
                continue
            out.append(Record(owner=owner_of(subkey), value=item.value, expiration=float(item.expiration_time)))
        return out

    # --- averaging -------------------------------------------------------------------------
    def all_reduce(self, vector: np.ndarray, *, group_key: str, group_size: int, gather: Any,
                   timeout: float, wait_until: float | None = None) -> ReduceResult:
        start = time.perf_counter()
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
        try:
            gathered = self._averager.step(gather=gather, weight=1.0, scheduled_time=scheduled,
                                           timeout=max(timeout, scheduled - now + 1.0), allow_retries=True)
        except Exception as e:
            raise TransportError(f"all-reduce failed: {type(e).__name__}: {e}") from None
        if not gathered:
            raise TransportError("all-reduce failed: no group formed before the deadline")
        with self._averager.get_tensors() as tensors:
            result = tensors[0].numpy().copy()
        return ReduceResult(vector=result, gathered={str(k): v for k, v in gathered.items()},
                            seconds=time.perf_counter() - start)

    # --- state -----------------------------------------------------------------------------
    def serve_state(self, provider: StateProvider) -> None:
        self._averager.state_provider = provider

    def download_state(self, timeout: float) -> tuple[dict, list[np.ndarray]] | None:
        try:
            got = self._averager.load_state_from_peers(timeout=timeout)
        except Exception:
            return None
        if not got:
            return None
        meta, tensors = got
        return meta, [t.numpy() for t in tensors]

    def shutdown(self) -> None:
        for part in (self._averager, self.dht):
            try:
                if part is not None and part.is_alive():
                    part.shutdown()
            except Exception:
                pass
