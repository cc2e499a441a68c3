"""State download over the TCP transport: a joiner gets (metadata, tensors) from a peer that serves them.

Why this shape: a joiner downloads up to hundreds of MB from peers it has no reason to trust, any of
which may die mid-way. So the download is *declared* before a byte of it moves (size, capped by what
this run's state can weigh; chunk size; one SHA-256 per chunk), *verified* chunk by chunk as it
arrives (a wrong chunk ends that source at once, not after the whole state), *bounded* (one
deadline for the whole download, one per chunk, at most the declared bytes) and *resumable*: the
state hash covers every chunk digest, so another server announcing the same hash holds the same
bytes, and the download goes on from the offset reached (a server with other state starts over).
Whether the state is the swarm's is the caller's business (`swarm.sync`): the transport checks only
that the bytes are the ones their server declared.

Announcements: a server puts `{"round": r}` under `state_key(run)` (signed, like every record),
refreshed while it runs. Downloaders ask sources of round >= `min_round`, newest round first; ties
in an order fixed per downloader (`order_sources`), so joiners spread over equal servers.

Protocol, on a connection dialed for service "state" (`TcpNode.open_service`):

    downloader -> server  {"t": "get", "h": state hash it holds part of (or nil), "o": byte offset}
    server -> downloader  {"t": "head", "h": state hash, "meta": msgpack(metadata), "specs": [[dtype, shape], ...],
                           "size": bytes, "chunk": bytes per chunk, "digests": [sha256 of each chunk], "o": first offset}
                       or {"t": "none", "why": "..."}                      (no state, busy, too big for a frame)
                          {"t": "chunk", "i": index, "d": bytes}  from chunk o / chunk to the last, in order
                          {"t": "end"}

    state hash = sha256(msgpack(["swarm-state/1", meta, specs, size, chunk, digests]))

A server starts at "o" only when "h" is its own state's hash (else at 0). A server that declares
what this run's state cannot weigh, sends a chunk out of order, of the wrong length or not matching
its digest, or more than it declared, is lying: its download ends and it is never asked again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from swarm.transport.base import StateProvider
from swarm.transport.chaos import die_when_serving
from swarm.transport.tcp.channel import HANDSHAKE_TIMEOUT, Channel, ChannelError

if TYPE_CHECKING:
    from swarm.transport.tcp.node import TcpNode

__all__ = ["StateService", "Snapshot", "build_snapshot", "check_head", "order_sources", "state_key", "Lying"]

log = logging.getLogger("swarm.transport.tcp")

SERVICE = "state"
LABEL = "swarm-state/1"
CHUNK = 1 << 20               # bytes per chunk a server sends (a frame holds one, under the 4 MiB frame cap)
MAX_CHUNK = 2 << 20           # a downloader refuses larger chunks
META_BYTES = 4 << 20          # a state's metadata, at most (and the slack of the size cap)
MAX_TENSORS = 1 << 16        # tensors in a state (4 per adapter tensor: a large model's LoRA has thousands)
DEFAULT_MAX_STATE = 1 << 30   # the size cap until the run's vector size is known (`StateService.open`)
ANNOUNCE_TTL = 90.0           # seconds a state announcement lives; refreshed every third of it
CHUNK_TIMEOUT = 10.0          # seconds a downloader waits for the next chunk (or the head) before the next source
REQUEST_TIMEOUT = 10.0        # seconds a server waits for a downloader's request
SEND_TIMEOUT = 30.0           # seconds a server waits for a downloader to take one chunk
MAX_SERVING = 4               # downloads a server serves at once (more are told "busy")
AVOID = 60.0                  # seconds a source that failed (gone, slow, too big) is not asked again
MIN_LEFT = 0.5                # seconds of the deadline worth starting another source with


class Lying(Exception):
    """A server broke the protocol or sent bytes other than it declared: one line saying how."""


def state_key(run: str | None) -> str:
    return f"_swarm.tcp.state.{run}" if run else "_swarm.tcp.state"


def max_state_bytes(vector_size: int | None) -> int:
    """What a state can weigh: the adapter, two Adam moments and momentum (float32 each), plus metadata."""
    return DEFAULT_MAX_STATE if vector_size is None else 4 * 4 * int(vector_size) + META_BYTES


# --- what a server holds ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    meta: bytes                     # msgpack of the metadata
    specs: list                     # [[dtype str, [dims]], ...]
    blob: bytes                     # every tensor's bytes, in order
    chunk: int
    digests: list                   # sha256 of each chunk of `blob`
    hash: bytes

    def head(self, start: int) -> dict:
        return {"t": "head", "h": self.hash, "meta": self.meta, "specs": self.specs, "size": len(self.blob),
                "chunk": self.chunk, "digests": self.digests, "o": start * self.chunk}

    def piece(self, i: int) -> bytes:
        return self.blob[i * self.chunk:(i + 1) * self.chunk]


def state_hash(meta: bytes, specs: list, size: int, chunk: int, digests: list) -> bytes:
    return hashlib.sha256(msgpack.packb([LABEL, meta, specs, size, chunk, digests], use_bin_type=True)).digest()


def build_snapshot(meta: Any, arrays: list[np.ndarray], chunk: int = CHUNK) -> Snapshot:
    """The wire form of (metadata, tensors): one byte string cut in `chunk`-byte pieces, each hashed."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    specs = [[a.dtype.str, [int(d) for d in a.shape]] for a in arrays]
    blob = b"".join(a.tobytes() for a in arrays)
    digests = [hashlib.sha256(blob[o:o + chunk]).digest() for o in range(0, len(blob), chunk)]
    meta_b = msgpack.packb(meta, use_bin_type=True)
    return Snapshot(meta_b, specs, blob, chunk, digests, state_hash(meta_b, specs, len(blob), chunk, digests))


# --- what a downloader checks --------------------------------------------------------------------------
@dataclass(frozen=True)
class Head:
    hash: bytes
    meta: bytes
    specs: list
    size: int
    chunk: int
    digests: list
    start: int          # index of the first chunk the server sends

    @property
    def chunks(self) -> int:
        return len(self.digests)

    def length(self, i: int) -> int:
        return min(self.chunk, self.size - i * self.chunk)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dtype(text: Any) -> np.dtype | None:
    if not isinstance(text, str) or len(text) > 8:
        return None
    try:
        dt = np.dtype(text)
    except TypeError:
        return None
    return dt if dt.kind in "fiub" and 0 < dt.itemsize <= 8 else None


def check_head(msg: dict, cap: int) -> Head:
    """The declaration of a "head" message, checked against itself and the size cap; Lying if anything is off."""
    size, chunk, digests, meta, specs, h, o = (msg.get(k) for k in ("size", "chunk", "digests", "meta", "specs", "h", "o"))
    if not (_int(size) and _int(chunk) and _int(o) and isinstance(meta, bytes) and isinstance(h, bytes)
            and isinstance(specs, list) and isinstance(digests, list)):
        raise Lying("its state declaration is malformed")
    if not 0 <= size <= cap:
        raise Lying(f"it declared a {size}-byte state (this run's state weighs at most {cap} bytes)")
    if not 0 < chunk <= MAX_CHUNK or len(meta) > META_BYTES or len(specs) > MAX_TENSORS:
        raise Lying("its chunk size, metadata or tensor count is out of bounds")
    if len(digests) != math.ceil(size / chunk) or not all(isinstance(d, bytes) and len(d) == 32 for d in digests):
        raise Lying("its chunk digests do not match its declared size")
    total = 0
    for spec in specs:
        dt = _dtype(spec[0]) if isinstance(spec, list) and len(spec) == 2 else None
        shape = spec[1] if dt is not None else None
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_int(d) and 0 <= d <= cap for d in shape)):
            raise Lying("a tensor's dtype or shape is malformed")
        total += dt.itemsize * math.prod(shape)
    if total != size:
        raise Lying(f"its tensors weigh {total} bytes, not the {size} it declared")
    if o % chunk or not 0 <= o <= size:
        raise Lying("its starting offset is not a chunk boundary of the state")
    if h != state_hash(meta, specs, size, chunk, digests):
        raise Lying("its state hash does not cover its declaration")
    return Head(h, meta, specs, size, chunk, digests, o // chunk)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not allowed")


def assemble(head: Head, buf: bytearray) -> tuple[Any, list[np.ndarray]]:
    """(metadata, tensors) of a complete, verified download."""
    try:
        meta = msgpack.unpackb(head.meta, raw=False, strict_map_key=False, ext_hook=_no_ext)
    except Exception:
        raise Lying("its metadata does not decode") from None
    arrays, offset = [], 0
    for dtype, shape in head.specs:
        dt = np.dtype(dtype)
        n = math.prod(shape)
        arrays.append(np.frombuffer(buf, dtype=dt, count=n, offset=offset).reshape(shape))
        offset += n * dt.itemsize
    return meta, arrays


def order_sources(records: list, me: str, min_round: int, avoid: set[str]) -> list[str]:
    """Peer ids of state announcements (`Record`s) of round >= `min_round`, not `me`, not in `avoid`: newest round
    first, ties in an order fixed for this downloader (a hash of both ids), so joiners spread over equal servers."""
    rounds: dict[str, int] = {}
    for rec in records:
        value = rec.value
        r = value.get("round") if isinstance(value, dict) else None
        if _int(r) and r >= min_round and rec.owner != me and rec.owner not in avoid:
            rounds[rec.owner] = r
    return sorted(rounds, key=lambda p: (-rounds[p], hashlib.sha256(f"{me}|{p}".encode()).digest()))


class _Partial:
    """A download in progress: the declaration it follows, the bytes so far, the next chunk wanted."""

    def __init__(self, head: Head) -> None:
        self.head = head
        self.buf = bytearray(head.size)
        self.next = 0


# --- the service ------------------------------------------------------------------------------------
class StateService:
    """Serving and downloading state for one `TcpTransport` (its node, records and clock)."""

    def __init__(self, node: "TcpNode", get_records, chunk: int = CHUNK) -> None:
        self.node = node
        self.get_records = get_records        # key -> list[Record] (the transport's `get`)
        self.chunk = chunk
        self.run: str | None = None
        self.vector_size: int | None = None
        self.provider: StateProvider | None = None
        self.round: int | None = None
        self.distrusted: set[str] = set()
        self.avoid: dict[str, float] = {}     # source -> monotonic time until which it is not asked
        self.banned: set[str] = set()
        self.pace = 0.0                       # seconds a server waits between chunks (tests: a slow server)
        self.served: list[tuple[str, int]] = []  # (downloader, first chunk) of the last 100 downloads served
        self.received = 0                     # verified chunk bytes downloaded, all downloads together
        self._snapshot: Snapshot | None = None
        self._building: asyncio.Lock | None = None
        self._serving = 0
        self._refreshing = False
        node.register_service(SERVICE, self._serve)

    def open(self, run: str, vector_size: int | None) -> None:
        """The run (its announcements have a key of their own) and its vector size (the size cap)."""
        self.run, self.vector_size = run, vector_size

    # --- serving -------------------------------------------------------------------------------
    def serve(self, provider: StateProvider) -> None:
        self.provider = die_when_serving(provider)  # fault injection (swarm.transport.chaos), as with hivemind
        self._snapshot = None

    def announce(self, round_: int) -> None:
        """Say this peer serves state of `round_` (the state may have changed even if the round did not)."""
        self.round = int(round_)
        self._snapshot = None
        self.node.call(self._announce())

    async def _announce(self) -> None:
        await self._publish()
        if not self._refreshing:
            self._refreshing = True
            self.node.spawn(self._refresh())

    async def _publish(self) -> None:
        value = msgpack.packb({"round": self.round}, use_bin_type=True)
        why = await self.node.publish(state_key(self.run), value, self.node.clock() + ANNOUNCE_TTL)
        if why is not None:
            log.warning("state announcement not stored: %s", why)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(ANNOUNCE_TTL / 3)
            try:
                await self._publish()
            except Exception as e:  # upkeep must go on
                log.warning("state announcement failed: %s: %s", type(e).__name__, e)

    async def _snap(self) -> Snapshot | None:
        """The state served now: built once (provider and hashing off the loop), shared by concurrent downloads."""
        if self._building is None:
            self._building = asyncio.Lock()
        async with self._building:
            if self._snapshot is None and self.provider is not None:
                provider, chunk = self.provider, self.chunk

                def build() -> Snapshot | None:
                    meta, arrays = provider()
                    return None if meta is None else build_snapshot(meta, arrays, chunk)

                self._snapshot = await asyncio.get_running_loop().run_in_executor(None, build)
            return self._snapshot

    async def _serve(self, ch: Channel) -> None:
        """One download (the node closes the connection after): a request, then the head and the chunks."""
        if self._serving >= MAX_SERVING:
            await ch.send({"t": "none", "why": "busy"})
            return
        self._serving += 1
        try:
            req = await ch.recv(REQUEST_TIMEOUT)
            want, offset = req.get("h"), req.get("o")
            if req.get("t") != "get":
                return
            snap = await self._snap()
            if snap is None:
                await ch.send({"t": "none", "why": "no state yet"})
                return
            head_bytes = 64 * (len(snap.digests) + len(snap.specs)) + len(snap.meta) + 4096
            if head_bytes > ch.max_frame:
                log.warning("state of %d bytes needs a %d-byte head: more than a frame holds", len(snap.blob), head_bytes)
                await ch.send({"t": "none", "why": "state too large to declare"})
                return
            start = 0
            if want == snap.hash and _int(offset) and 0 <= offset <= len(snap.blob) and offset % snap.chunk == 0:
                start = offset // snap.chunk  # resumes what another server of this very state began
            self.served.append((ch.peer_id, start))
            del self.served[:-100]
            await ch.send(snap.head(start))
            for i in range(start, len(snap.digests)):
                if self.pace:
                    await asyncio.sleep(self.pace)
                await asyncio.wait_for(ch.send({"t": "chunk", "i": i, "d": snap.piece(i)}), SEND_TIMEOUT)
            await ch.send({"t": "end"})
        except (ChannelError, asyncio.TimeoutError) as e:
            log.info("state download by %s ended: %s", ch.peer_id, e or "too slow to take a chunk")
        except Exception as e:  # the provider failed: the downloader asks another peer
            log.warning("could not serve state to %s: %s: %s", ch.peer_id, type(e).__name__, e)
        finally:
            self._serving -= 1

    # --- downloading ---------------------------------------------------------------------------
    def distrust(self, source: str) -> None:
        self.distrusted.add(source)

    def download(self, timeout: float, min_round: int = 0, skip=frozenset()) -> tuple[Any, list[np.ndarray], str] | None:
        now = time.monotonic()
        self.avoid = {p: t for p, t in self.avoid.items() if t > now}
        avoid = set(skip) | self.distrusted | self.banned | set(self.avoid)
        sources = order_sources(self.get_records(state_key(self.run)), self.node.peer_id, min_round, avoid)
        if not sources or timeout <= 0:
            return None
        deadline = now + timeout
        try:
            return self.node.call(self._download(sources, deadline, max_state_bytes(self.vector_size)), timeout + 5.0)
        except Exception as e:  # the loop is gone (shutdown) or stuck: nothing was downloaded
            log.info("state download failed: %s: %s", type(e).__name__, e)
            return None

    async def _download(self, sources: list[str], deadline: float, cap: int):
        partial: list[_Partial | None] = [None]  # survives a source's timeout: the next one resumes it
        for source in sources:
            left = deadline - time.monotonic()
            if left <= MIN_LEFT:
                break
            try:
                done = await asyncio.wait_for(self._from(source, partial, cap, deadline), left)
            except Lying as e:
                log.warning("state source %s lied (%s): never asking it again", source, e)
                self.distrusted.add(source)
                continue
            except (ChannelError, asyncio.TimeoutError, OSError) as e:
                log.info("could not download state from %s: %s", source, e or "too slow")
                self.avoid[source] = time.monotonic() + AVOID
                continue
            if done is not None:
                meta, arrays = assemble(done.head, done.buf)
                return meta, arrays, source
        return None

    async def _from(self, source: str, partial: list, cap: int, deadline: float) -> _Partial | None:
        """Download from one source into `partial[0]` (resuming it when the source serves the same state): the
        complete download, or None when the source had nothing to serve."""
        timeout = lambda: max(0.05, min(CHUNK_TIMEOUT, deadline - time.monotonic()))  # noqa: E731
        ch = await self.node.open_service(source, SERVICE, timeout=min(HANDSHAKE_TIMEOUT, timeout()))
        try:
            held = partial[0]
            ask = {"t": "get", "h": None, "o": 0}
            if held is not None:
                ask = {"t": "get", "h": held.head.hash, "o": held.next * held.head.chunk}
            await ch.send(ask)
            msg = await ch.recv(timeout())
            if msg["t"] == "none":
                log.info("state source %s has nothing to serve: %s", source, str(msg.get("why"))[:80])
                return None
            if msg["t"] != "head":
                raise Lying(f"it answered a state request with {msg['t'][:20]!r}")
            head = check_head(msg, cap)
            if held is None or head.hash != held.head.hash:
                if head.start != 0:
                    raise Lying("it resumed a state this peer did not ask for")
                held = partial[0] = _Partial(head)  # another state (round): start over
            elif head.start > held.next:
                raise Lying("it skipped chunks this peer does not have")
            held.next = head.start
            while held.next < head.chunks:
                msg = await ch.recv(timeout())
                i, data = msg.get("i"), msg.get("d")
                if msg["t"] != "chunk" or i != held.next or not isinstance(data, bytes):
                    raise Lying(f"it sent {msg['t'][:20]!r} where chunk {held.next} of {head.chunks} belongs")
                if len(data) != head.length(i) or hashlib.sha256(data).digest() != head.digests[i]:
                    raise Lying(f"chunk {i} is not the one it declared")
                o = i * head.chunk
                held.buf[o:o + len(data)] = data
                held.next += 1
                self.received += len(data)
            end = await ch.recv(timeout())
            if end["t"] != "end":
                raise Lying("it sent more than the state it declared")
            partial[0] = None
            return held
        finally:
            ch.close()
