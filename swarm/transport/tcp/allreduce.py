"""The butterfly all-reduce of one formed group: reduce-scatter, then all-gather, of a float64 vector.

The vector of L values is cut into N contiguous spans, span j = [j*L//N, (j+1)*L//N) reduced by
member j (member order: the group's, fixed by its leader). Every member sends span j of its vector
to member j in chunks of at most `CHUNK_VALUES` values:

    {"t": "part", "c": chunk index, "d": raw little-endian float64 bytes}

Reducer j waits until chunk k has arrived from every member (its own part included), vets each
sender's part like hivemind's `_CheckedReducer.vet` (length, then `swarm.averaging.check_part`
against what the sender announced in its signed gather; a sender that fails is logged, named in
the rejections and replaced from that chunk on by `marker_part`), sums the parts in member order
in float64, divides by N and sends the very same bytes to every other member:

    {"t": "avg", "c": chunk index, "d": the averaged bytes}

and uses those bytes itself (decoded from the same buffer), so every member ends with the same
bits for every span. After its last chunk it sends {"t": "done", "rej": {member: why}} (the members
it rejected), so every member reports the same rejections.

Failure: anything unexpected (a chunk out of order, an averaged chunk of the wrong size, a closed
connection, a "abort" message, nothing received or sent by anyone for `chunk_timeout` seconds, or
the whole exchange over `timeout`) raises `ExchangeError`; the caller then closes every connection
of the group, so every other member fails too. No member returns a vector unless it received every
span whole. Frames are capped per connection (`frame_cap`) once the group has formed: a larger one
disconnects its sender.

Codec: the bytes of "part" and "avg" are the wire of `averaging.codec` (`swarm.codec`): float64 values and
float64 averages for exact (as above); for int8, int8 data + int64 check lanes out, and the reducer's integer
*sums* back (int16 data + int64 lanes), which every member turns into the same float64 average. The vetting,
markers, chunking and failure rules are the same for both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import msgpack
import numpy as np

from swarm.averaging import Expect, marker_part
from swarm.codec import ExactWire
from swarm.transport.tcp.channel import Channel, ChannelError

__all__ = ["Exchange", "ExchangeError", "Meter", "CHUNK_VALUES", "spans", "frame_cap"]

log = logging.getLogger("swarm.transport.tcp")

CHUNK_VALUES = 1 << 17      # values per part frame (1 MiB of float64): a protocol constant, every member uses it
FRAME_OVERHEAD = 1024       # a part frame's bytes besides its values, at most
MAX_REASON_CHARS = 300      # a rejection reason relayed in "done"


class ExchangeError(Exception):
    """The exchange failed: one line saying why."""


def spans(total: int, n: int) -> list[tuple[int, int]]:
    """[start, end) of each member's span: equal sizes (within one value), contiguous, in member order."""
    return [(total * j // n, total * (j + 1) // n) for j in range(n)]


def chunks(start: int, end: int) -> list[tuple[int, int]]:
    return [(a, min(a + CHUNK_VALUES, end)) for a in range(start, end, CHUNK_VALUES)]


def frame_cap() -> int:
    """The largest frame a group member may send once the group has formed."""
    return CHUNK_VALUES * 8 + FRAME_OVERHEAD


def _bin_header(n: int) -> int:
    return 2 if n < 1 << 8 else 3 if n < 1 << 16 else 5


def frame_bytes(msg: dict) -> int:
    """Bytes of `msg` on the wire (length header included), without packing a big payload twice."""
    data = msg.get("d")
    if isinstance(data, (bytes, bytearray, memoryview)):
        head = len(msgpack.packb({**msg, "d": b""}, use_bin_type=True)) - 2
        return 4 + head + _bin_header(len(data)) + len(data)
    return 4 + len(msgpack.packb(msg, use_bin_type=True))


@dataclass
class Meter:
    """Averaging traffic of this peer (frames, headers included)."""
    sent: int = 0
    received: int = 0
    last: float = field(default_factory=time.monotonic)  # when anything last moved

    async def send(self, ch: Channel, msg: dict) -> None:
        await ch.send(msg)
        self.sent += frame_bytes(msg)
        self.last = time.monotonic()

    async def recv(self, ch: Channel, idle_timeout: float | None = None) -> dict:
        msg = await ch.recv(idle_timeout)
        self.received += frame_bytes(msg)
        self.last = time.monotonic()
        return msg


class Exchange:
    """One member's side of the butterfly. `channels`: a connection to every other member, by peer id."""

    def __init__(self, vector: np.ndarray, members: list[str], me: str, channels: dict[str, Channel],
                 expects: list[Expect | None], meter: Meter, chunk_timeout: float, timeout: float,
                 wire: ExactWire | None = None) -> None:
        self.vector, self.members, self.me = vector, members, me
        self.wire = wire if wire is not None else ExactWire(expects)  # the codec's bytes (swarm.codec)
        self.n, self.i = len(members), members.index(me)
        self.total = len(vector)
        self.channels, self.expects, self.meter = channels, expects, meter
        self.chunk_timeout, self.timeout = chunk_timeout, timeout
        self.spans = spans(self.total, self.n)
        self.span_chunks = [chunks(*s) for s in self.spans]
        self.mine = self.span_chunks[self.i]
        self.result = np.empty(self.total, dtype=np.float64)
        # reducer state (this member's span)
        self.parts: list[list] = [[None] * self.n for _ in self.mine]
        for k, (a, b) in enumerate(self.mine):
            self.parts[k][self.i] = vector[a:b]
        self.reduced = 0
        self.rejected: dict[int, str] = {}
        # what each other member still owes this one
        self.next_part = [0] * self.n
        self.next_avg = [0] * self.n
        self.done = [False] * self.n
        self.reported: dict[int, dict[str, str]] = {}
        # outgoing: averaged chunks and "done" first, then this member's parts, per destination
        self.outbox: dict[int, deque] = {j: deque() for j in range(self.n) if j != self.i}
        self.wake: dict[int, asyncio.Event] = {j: asyncio.Event() for j in self.outbox}

    # --- reducing -------------------------------------------------------------------------------
    def _vet(self, sender: int, k: int, raw) -> np.ndarray:
        a, b = self.mine[k]
        reason = self.rejected.get(sender)
        if reason is None:
            part = raw
            if isinstance(raw, bytes):
                part, reason = self.wire.open_part(raw, a, b, self.total)
            if reason is None:
                reason = self.wire.check(sender, part, a, self.total)
            if reason is not None:
                self.rejected[sender] = reason
                log.warning("rejected the contribution of %s (part %d): %s", self.members[sender], k, reason)
        if reason is None:
            return part
        expect = self.expects[sender]
        return marker_part(b - a, a, self.total, expect.salt if expect else 0)

    def _reduce_ready(self) -> None:
        while self.reduced < len(self.mine) and all(p is not None for p in self.parts[self.reduced]):
            k = self.reduced
            a, b = self.mine[k]
            acc = np.zeros(b - a, dtype=np.float64)
            for sender in range(self.n):  # fixed order: member order
                acc += self._vet(sender, k, self.parts[k][sender])
            data = self.wire.pack_result(acc, a, self.total, self.n)
            self.result[a:b] = self.wire.open_result(data, a, b, self.total, self.n)  # the very bytes every member gets
            self.parts[k] = []
            self.reduced += 1
            self._post({"t": "avg", "c": k, "d": data})
        if self.reduced == len(self.mine) and not getattr(self, "_done_posted", False):
            self._done_posted = True
            rej = {self.members[s]: why[:MAX_REASON_CHARS] for s, why in sorted(self.rejected.items())}
            self._post({"t": "done", "rej": rej})

    def _post(self, msg: dict) -> None:
        for j, box in self.outbox.items():
            box.append(msg)
            self.wake[j].set()

    # --- connections ----------------------------------------------------------------------------
    async def _write(self, j: int) -> None:
        ch, box = self.channels[self.members[j]], self.outbox[j]
        own = iter(enumerate(self.span_chunks[j]))
        parts_left = True
        while True:
            if box:
                msg = box.popleft()
            elif parts_left:
                nxt = next(own, None)
                if nxt is None:
                    parts_left = False
                    continue
                k, (a, b) = nxt
                msg = {"t": "part", "c": k, "d": self.wire.pack_part(self.vector[a:b], a, self.total)}
            elif getattr(self, "_done_posted", False):
                return  # "done" was the last thing queued, and it went
            else:
                self.wake[j].clear()
                await self.wake[j].wait()
                continue
            await self.meter.send(ch, msg)

    async def _read(self, j: int) -> None:
        name = self.members[j]
        ch = self.channels[name]
        theirs = self.span_chunks[j]
        while self.next_part[j] < len(self.mine) or not self.done[j]:
            try:
                msg = await self.meter.recv(ch)
            except ChannelError as e:
                raise ExchangeError(f"member {name}: {e}") from None
            t = msg["t"]
            if t == "part":
                k, data = msg.get("c"), msg.get("d")
                if k != self.next_part[j] or k >= len(self.mine) or not isinstance(data, bytes):
                    raise ExchangeError(f"member {name} sent part {k!r} out of order (expected {self.next_part[j]} "
                                        f"of {len(self.mine)})")
                self.parts[k][j] = data
                self.next_part[j] += 1
                self._reduce_ready()
            elif t == "avg":
                k, data = msg.get("c"), msg.get("d")
                if k != self.next_avg[j] or k >= len(theirs) or not isinstance(data, bytes):
                    raise ExchangeError(f"member {name} sent averaged chunk {k!r} out of order")
                a, b = theirs[k]
                got = self.wire.open_result(data, a, b, self.total, self.n)
                if got is None:
                    raise ExchangeError(f"member {name} sent an averaged chunk of {len(data)} bytes, expected "
                                        f"{self.wire.result_bytes(a, b, self.total)}")
                self.result[a:b] = got
                self.next_avg[j] += 1
            elif t == "done":
                rej = msg.get("rej")
                if self.done[j] or self.next_avg[j] != len(theirs) or not isinstance(rej, dict) or len(rej) > self.n \
                        or not all(isinstance(p, str) and p in self.members and isinstance(w, str) for p, w in rej.items()):
                    raise ExchangeError(f"member {name} sent a malformed or early end of its span")
                self.reported[j] = {p: w[:MAX_REASON_CHARS] for p, w in rej.items()}
                self.done[j] = True
            elif t == "abort":
                raise ExchangeError(f"member {name} gave up: {str(msg.get('why'))[:200]}")
            else:
                raise ExchangeError(f"member {name} sent an unexpected {t[:20]!r} message")

    async def run(self) -> tuple[np.ndarray, dict[str, str]]:
        """(the averaged vector, rejections: member -> why, as its reducer reported it)."""
        self._reduce_ready()  # a group of one chunkless span, or nothing to wait for
        tasks = [asyncio.ensure_future(self._read(j)) for j in self.outbox]
        tasks += [asyncio.ensure_future(self._write(j)) for j in self.outbox]
        deadline = time.monotonic() + self.timeout
        self.meter.last = time.monotonic()
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, timeout=0.1, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    error = task.exception()
                    if isinstance(error, (ExchangeError, ChannelError)):
                        raise error
                    if error is not None:  # a bug, or a frame this member could not encode: fail the attempt alike
                        raise ExchangeError(f"{type(error).__name__}: {error}")
                now = time.monotonic()
                if pending and now - self.meter.last > self.chunk_timeout:
                    raise ExchangeError(f"nothing moved for {self.chunk_timeout:g}s (waiting for {self._waiting()})")
                if pending and now > deadline:
                    raise ExchangeError(f"the exchange took over {self.timeout:g}s (waiting for {self._waiting()})")
        except ChannelError as e:
            raise ExchangeError(str(e)) from None
        finally:
            for task in tasks:
                task.cancel()
            ended, _ = await asyncio.wait(tasks, timeout=2.0)  # bounded: the caller closes the connections anyway
            for task in ended:
                if not task.cancelled():
                    task.exception()
        if self.reduced != len(self.mine) or any(self.next_avg[j] != len(self.span_chunks[j]) for j in self.outbox):
            raise ExchangeError("the exchange ended with spans missing")  # not reached: every reader saw its "done"
        rejections: dict[str, str] = {}
        for j in range(self.n):  # reducers in member order: the first reason given for a member wins
            reported = ({self.members[s]: w for s, w in sorted(self.rejected.items())} if j == self.i
                        else self.reported.get(j, {}))
            for p, why in reported.items():
                rejections.setdefault(p, why)
        return self.result, rejections

    def _waiting(self) -> str:
        slow = sorted({self.members[j] for j in self.outbox
                       if self.next_part[j] < len(self.mine) or not self.done[j]})
        return ", ".join(slow) or "sends to finish"
