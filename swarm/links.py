"""Emulated consumer links for the local testbed (`swarm.testbed --link UP/DOWN/RTT`).

Why a userspace relay: the links must work without root and on a kernel without netem (no `tc
qdisc ... netem delay`), and a testbed runs every peer on 127.0.0.1. So each peer k listens on a
private port and *announces* (libp2p `announce_maddrs`) the port of its relay instead; every other
peer dials the relay, which forwards the bytes through emulated links:

    dialer j --[j's uplink]--[k's downlink]--> peer k      (and back: k's uplink, j's downlink)

A link is one direction of one peer's access line: a FIFO serializer at its rate (a chunk of n
bytes leaves `n * 8 / rate` seconds after the previous one) followed by a one-way delay of RTT/2.
All connections of a peer share its two links, as they share a real home line. A peer's RTT is the
round trip its own line adds, so two peers with 40 ms lines see 80 ms between them, and a peer with
a 20 Mbit uplink sending to one with a 100 Mbit downlink gets 20 Mbit/s.

The relay knows who dials: libp2p (go-libp2p's TCP transport with reuseport) dials from its listen
port, so a connection from 127.0.0.1:<peer j's private port> is peer j. A connection from any other
port (a client outside the swarm, or a libp2p without reuseport) crosses the callee's line only and
is counted in `unidentified`. A peer may have several relay ports (`add_peer(entries=n)`), all behind
the same line: a transport that opens more than one connection to the same peer at once from its one
listen port (swarm's tcp transport: gossip, all-reduce and state connections) needs a distinct
remote port for each, or the second connection's 4-tuple would be the first's; it announces them all
and dials the next one when a 4-tuple is taken.

Backpressure: the relay stops reading a connection while more than `QUEUE_SECONDS` of its bytes wait
in the serializers (a router's buffer), so senders see the link's rate, not loopback's. The relay
is an asyncio loop on a thread of the testbed: it reaches a few hundred Mbit/s in total, enough for
home links, not for emulating 10 Gbit LANs (`scripts/bench_links.py` measures what it achieves).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from dataclasses import dataclass, field

from swarm import SwarmError

CHUNK = 32 * 1024          # bytes read per step: 13 ms at 20 Mbit/s
QUEUE_SECONDS = 0.05       # the most a connection may keep queued in front of its links before the relay stops reading
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_SPEC_HELP = "expected UP/DOWN/RTT like 20mbit/100mbit/40ms (rates in bit, kbit, mbit or gbit; RTT in us, ms or s)"


@dataclass(frozen=True)
class LinkSpec:
    """One peer's access line: uplink and downlink rates (bits per second) and the round trip it adds (seconds)."""

    up_bps: float
    down_bps: float
    rtt: float

    @classmethod
    def parse(cls, text: str) -> "LinkSpec":
        parts = text.strip().split("/")
        if len(parts) != 3:
            raise SwarmError(f"--link {text!r}: {_SPEC_HELP}")
        up, down = (_quantity(p, _RATE_UNITS, text, "rate") for p in parts[:2])
        rtt = _quantity(parts[2], _TIME_UNITS, text, "RTT")
        if up <= 0 or down <= 0:
            raise SwarmError(f"--link {text!r}: rates must be positive")
        if not (1e3 <= min(up, down) and max(up, down) <= 1e11):
            raise SwarmError(f"--link {text!r}: rates must be between 1kbit and 100gbit")
        if rtt > 10.0:
            raise SwarmError(f"--link {text!r}: an RTT above 10s is not a link")
        return cls(up, down, rtt)

    def __str__(self) -> str:
        return f"{_fmt_rate(self.up_bps)}/{_fmt_rate(self.down_bps)}/{self.rtt * 1e3:g}ms"


def _quantity(text: str, units: dict[str, float], spec: str, what: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*", text)
    if not m or m.group(2).lower() not in units:
        raise SwarmError(f"--link {spec!r}: {what} {text!r} is not understood; {_SPEC_HELP}")
    return float(m.group(1)) * units[m.group(2).lower()]


def _fmt_rate(bps: float) -> str:
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps:g}bit"


def parse_links(text: str, peers: int) -> list[LinkSpec]:
    """`--link`: one spec for every peer, or a comma list with one per peer."""
    specs = [LinkSpec.parse(t) for t in text.split(",")]
    if len(specs) == 1:
        specs *= peers
    if len(specs) != peers:
        raise SwarmError(f"--link: {len(specs)} links for {peers} peers (give one, or one per peer)")
    return specs


class Link:
    """One direction of a peer's line: a FIFO serializer at `bps`, then a one-way `delay` (pure arithmetic)."""

    def __init__(self, bps: float, delay: float) -> None:
        self.bytes_per_s = bps / 8.0
        self.delay = delay
        self.free_at = 0.0  # when the serializer has sent everything queued so far
        self.bytes = 0

    def schedule(self, n: int, t: float) -> tuple[float, float]:
        """`n` bytes reaching the line at time `t`: (when their last bit leaves the serializer, when it arrives)."""
        start = max(t, self.free_at)
        self.free_at = start + n / self.bytes_per_s
        self.bytes += n
        return self.free_at, self.free_at + self.delay


def schedule_path(links: list[Link], n: int, now: float) -> tuple[float, float]:
    """`n` bytes crossing `links` in order from `now`: (how long they queue in front of serializers, arrival time)."""
    t, queued = now, 0.0
    for link in links:
        left, arrive = link.schedule(n, t)
        queued = max(queued, left - n / link.bytes_per_s - t)  # waiting for earlier bytes (a router's queue)
        t = arrive
    return queued, t


@dataclass
class PeerLinks:
    spec: LinkSpec
    upstream_port: int   # where the peer really listens (and dials from)
    relay_port: int = 0  # what it announces
    relay_ports: list[int] = field(default_factory=list)  # all its relay ports (relay_port first), all behind this line
    up: Link = field(init=False)
    down: Link = field(init=False)

    def __post_init__(self) -> None:
        self.up = Link(self.spec.up_bps, self.spec.rtt / 2)
        self.down = Link(self.spec.down_bps, self.spec.rtt / 2)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the peer binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LinkEmulator:
    """The relays of a testbed's peers, run on one background thread; `add_peer` before `start`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.peers: list[PeerLinks] = []
        self._socks: list[tuple[int, socket.socket]] = []  # (peer index, relay socket)
        self.unidentified = 0    # connections from a port no peer listens on: shaped by the callee's line only
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    def add_peer(self, spec: LinkSpec, upstream_port: int, entries: int = 1) -> int:
        """Put the peer listening on `upstream_port` behind `spec`; returns the relay port it must announce.
        `entries` > 1: that many relay ports for it (`PeerLinks.relay_ports`), all crossing the same line."""
        peer = PeerLinks(spec, upstream_port)
        for _ in range(max(1, entries)):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            sock.listen(128)
            sock.setblocking(False)
            self._socks.append((len(self.peers), sock))
            peer.relay_ports.append(sock.getsockname()[1])
        peer.relay_port = peer.relay_ports[0]
        self.peers.append(peer)
        return peer.relay_port

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="swarm-links", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise SwarmError("the link emulator did not start")

    def _run(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        servers = []

        async def serve():
            for k, sock in self._socks:
                servers.append(await asyncio.start_server(
                    lambda r, w, k=k: self._spawn(self._relay(k, r, w)), sock=sock))
            ready.set()

        self._loop.run_until_complete(serve())
        try:
            self._loop.run_forever()
        finally:
            for s in servers:
                s.close()
            for t in list(self._tasks):
                t.cancel()
            self._loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            self._loop.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        """Close every relay and connection; idempotent."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        for _, sock in self._socks:
            sock.close()

    def stats(self) -> list[dict]:
        """Per peer: its line and the bytes that crossed it each way so far."""
        return [{"link": str(p.spec), "relay_port": p.relay_port, "bytes_up": p.up.bytes, "bytes_down": p.down.bytes}
                for p in self.peers]

    async def _relay(self, k: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        callee = self.peers[k]
        src_port = writer.get_extra_info("peername")[1]
        dialer = next((p for p in self.peers if p.upstream_port == src_port), None)
        self.connections += 1
        if dialer is None:
            self.unidentified += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, callee.upstream_port)
        except OSError:
            writer.close()
            return
        for w in (writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        inbound = ([dialer.up] if dialer else []) + [callee.down]
        outbound = [callee.up] + ([dialer.down] if dialer else [])
        try:
            await asyncio.gather(pipe(reader, up_writer, inbound), pipe(up_reader, writer, outbound))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, links: list[Link]) -> None:
    """Copy `reader` to `writer`, each chunk delivered when it would arrive across `links`."""
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver():
        while True:
            arrive, data = await queue.get()
            wait = arrive - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.get_running_loop().create_task(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            now = time.monotonic()
            if not data:
                await queue.put((now + max((l.delay for l in links), default=0.0), None))
                break
            queued, arrive = schedule_path(links, len(data), now)
            await queue.put((arrive, data))
            if queued > QUEUE_SECONDS:  # a full router buffer: the sender's TCP sees the link's rate
                await asyncio.sleep(queued - QUEUE_SECONDS)
        await sender
    finally:
        if not sender.done():
            sender.cancel()
