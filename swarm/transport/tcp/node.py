"""The gossip node: listens, dials, and keeps a full copy of every signed record of the swarm.

Why full replication: swarms have tens to hundreds of peers and every peer reads every advert
anyway, so each node holds all records (a few MB at most, `records.Limits`) and answers `get`
locally, with no lookup on the network.

Spreading (flooding with dedup): a record this node accepts as new (`RecordStore.add` is None),
whether `put` here or received, is sent to every connected peer but the one it came from. A record
a node already holds is refused as stale and goes no further, so every record crosses each
connection at most about once. On every new connection each side first sends its whole live store
("sync"), so a late joiner, or a peer back from a partition, catches up. Connections are reliable
(TCP); a peer too slow to drain its send queue is disconnected, and the sync on reconnection
repairs what it missed.

Peer exchange: each node puts a record under `ADDR_KEY` listing its own addresses, refreshed
while it runs. A node that learns such a record dials its owner (the address must name that owner
in /p2p/) while it has fewer than `max_dialed` outgoing connections, so a swarm grows into a
well-connected random graph from a single initial peer. Two nodes that dial each other at once
keep the connection dialed by the smaller peer id.

Messages (channel frames, msgpack maps): {"t": "rec", "r": [record, ...]} (`SignedRecord.to_wire`,
at most `peer.MAX_BATCH` per frame) and {"t": "ping"} (keepalive). Unknown types are ignored (newer peers may send more); a malformed
known one, a record with a bad signature or a broken frame disconnects its sender.

Services: a connection whose dialer named a service in the handshake (`channel.dial(service=...)`)
is not gossip: it goes to the handler `register_service` gave for that name (state download, for
one), which owns it until it returns; an unknown service is closed. `open_service` dials a peer (at
the addresses its signed address record lists) for one.

Dialing from the listen port (`dial_from_listen`, on where the peer `announce`s an address): every
connection is dialed from this node's listen address and port (SO_REUSEADDR + SO_REUSEPORT on the
listener and the dialing socket), as go-libp2p's reuseport TCP transport does. A relay in front of
a peer (`swarm.links`, the testbed's emulated lines, or a NAT mapping the listen port) then sees the
dialer's known port. A connection that would reuse a 4-tuple already taken (a second connection to
the same remote address at once: gossip and an "avg" or "state" connection) goes to the peer's next
listed address (a relay gives each peer several, `swarm.links`), and only when every one is taken,
or where the platform has no SO_REUSEPORT (Windows), from an ephemeral port. Off by default: two peers
dialing each other's listen ports directly from their own would be one 4-tuple (TCP simultaneous open).

Threading (STYLE habit 4): the event loop runs on its own thread (`loop.LoopThread`: uvloop where it
imports, asyncio's loop elsewhere, e.g. Windows); callers get plain synchronous calls.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from typing import Any, Awaitable, Callable, Coroutine

import msgpack

from swarm.key import SwarmKey
from swarm.transport.tcp import addresses
from swarm.transport.tcp.channel import (HANDSHAKE_TIMEOUT, MAX_FRAME, REUSEPORT, Channel, ChannelError, Collision,
                                         TlsContexts, accept, dial)
from swarm.transport.tcp.identity import Identity
from swarm.transport.tcp.loop import LoopThread
from swarm.transport.tcp.peer import IDLE_TIMEOUT, Peer, parse_records
from swarm.transport.tcp.records import STALE, Limits, RecordStore, SignedRecord, sign

__all__ = ["TcpNode", "ADDR_KEY"]

log = logging.getLogger("swarm.transport.tcp")

ADDR_KEY = "_swarm.tcp.addrs"   # value: list of this owner's multiaddrs
ADDR_TTL = 60.0                 # refreshed every third of it
MAX_ADDRS = 8                   # addresses per peer, at most
TICK = 0.5                      # seconds between maintenance passes
DIAL_BACKOFF = 10.0             # seconds before a failed address is dialed again


def _dialable_host(host: str) -> str:
    """The address others may dial for a listener on `host`: for a wildcard, the interface this machine
    routes outgoing traffic through (a UDP `connect` sends no packet), else loopback. `announce` overrides."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    v6 = host == "::"
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("2001:db8::1" if v6 else "192.0.2.1", 9))  # documentation addresses: never contacted
        return s.getsockname()[0]
    except OSError:
        return "::1" if v6 else "127.0.0.1"
    finally:
        s.close()


class TcpNode:
    """A gossip node on its own event loop thread. Start it, then call `put`/`get`; `shutdown` ends it."""

    def __init__(self, identity: Identity, *, host: str = "127.0.0.1", port: int = 0,
                 initial_peers: list[str] | None = None, swarm_key: SwarmKey | None = None,
                 announce: list[str] | None = None, limits: Limits = Limits(), max_frame: int = MAX_FRAME,
                 max_dialed: int = 8, max_connections: int = 256, clock: Callable[[], float] = time.time,
                 startup_timeout: float = 15.0, dial_from_listen: bool = False) -> None:
        self.identity, self.peer_id = identity, identity.peer_id
        self.swarm_key, self.max_frame, self.clock = swarm_key, max_frame, clock
        self.max_dialed, self.max_connections = max_dialed, max_connections
        self.dial_from_listen = dial_from_listen and REUSEPORT
        self._local: tuple[str, int] | None = None  # where to dial from (`dial_from_listen`), once listening
        self.store = RecordStore(limits, clock)
        self.initial = [addresses.parse(a) for a in initial_peers or []]  # ValueError for a bad one, before any socket
        self._announce = [self._own_address(a) for a in announce or []]
        self._tls = TlsContexts(identity)
        self._peers: dict[str, Peer] = {}
        self._connections = 0                       # sockets open, handshaking ones included
        self._failed: dict[str, float] = {}         # address -> when dialing it last failed
        self._dialing: set[str] = set()             # peer ids being dialed
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self.disconnects: dict[str, int] = {}       # why peers were dropped -> count
        self._services: dict[str, Callable[[Channel], Awaitable[None]]] = {}
        self._runner = LoopThread(f"tcp-node-{self.peer_id[-6:]}")
        try:
            self._call(self._start(host, port), startup_timeout)
        except BaseException:
            self.shutdown()
            raise

    def _own_address(self, text: str) -> str:
        """An address to announce, with this peer's id (`--announce` may leave /p2p/ out); ValueError if bad."""
        addr = addresses.parse(text, require_peer_id=False)
        if addr.peer_id not in (None, self.peer_id):
            raise ValueError(f"{text} names peer {addr.peer_id}, not this peer ({self.peer_id})")
        return addresses.format_address(addr.host, addr.port, self.peer_id, addr.family)

    # --- synchronous API (any thread) ---------------------------------------------------------
    def put(self, key: str, value: bytes, expiration: float) -> bool:
        rec = sign(self.identity, key, value, expiration)
        return self._call(self._put(rec)) is None

    def put_why(self, key: str, value: bytes, expiration: float) -> str | None:
        """Like `put`, but the reason a record was refused (None: stored and spreading)."""
        return self._call(self._put(sign(self.identity, key, value, expiration)))

    def get(self, key: str) -> list[SignedRecord]:
        return self._call(self._async(lambda: self.store.get(key)))

    def peers(self) -> list[str]:
        """Peer ids connected right now."""
        return self._call(self._async(lambda: sorted(self._peers)))

    def visible_maddrs(self) -> list[str]:
        return list(self._addrs)

    def call(self, coro: Coroutine, timeout: float = 30.0) -> Any:
        """Run `coro` on the node's loop from another thread; its result (or its exception)."""
        return self._call(coro, timeout)

    def spawn(self, coro: Coroutine) -> None:
        """(On the node's loop) run `coro` in the background until it ends or the node shuts down."""
        self._spawn(coro)

    async def publish(self, key: str, value: bytes, expiration: float) -> str | None:
        """(On the node's loop) `put_why` for code already running there."""
        return self._accept(sign(self.identity, key, value, expiration), None)

    def register_service(self, name: str, handler: Callable[[Channel], Awaitable[None]]) -> None:
        """Hand inbound connections opened for `name` to `handler` (a coroutine run on the node's loop; the
        connection is closed when it returns). Replaces an earlier handler of that name."""
        self._services[name] = handler

    async def open_service(self, peer_id: str, name: str, timeout: float = HANDSHAKE_TIMEOUT) -> Channel:
        """(On the node's loop) a new connection to `peer_id` for service `name`, dialed at the addresses of its
        signed address record; ChannelError if it has none or none answers within `timeout` seconds each."""
        rec = self.store.latest(ADDR_KEY, peer_id)
        try:
            listed = msgpack.unpackb(rec.value, raw=False) if rec is not None else []
        except Exception:
            listed = []
        errors, collided = [], []
        for text in listed[:MAX_ADDRS] if isinstance(listed, list) else []:
            try:
                addr = addresses.parse(text)
            except ValueError:
                continue
            if addr.peer_id != peer_id:
                continue
            try:  # from the listen port: another address of the peer when this 4-tuple is taken (see the docstring)
                return await dial(addr.host, addr.port, peer_id, self.identity, self._tls, self.swarm_key,
                                  timeout=timeout, max_frame=self.max_frame, service=name, local=self._local,
                                  strict_local=True)
            except Collision:
                collided.append(addr)
            except ChannelError as e:
                errors.append(str(e))
        for addr in collided[:1]:  # every address collided: from an ephemeral port
            try:
                return await dial(addr.host, addr.port, peer_id, self.identity, self._tls, self.swarm_key,
                                  timeout=timeout, max_frame=self.max_frame, service=name)
            except ChannelError as e:
                errors.append(str(e))
        raise ChannelError(f"cannot reach peer {peer_id}" + (f": {errors[-1]}" if errors else " (no address known)"))

    def shutdown(self) -> None:
        self._runner.stop(self._stop())

    # --- loop plumbing ------------------------------------------------------------------------
    def _call(self, coro: Coroutine, timeout: float = 30.0) -> Any:
        return self._runner.call(coro, timeout)

    @staticmethod
    async def _async(fn: Callable[[], Any]) -> Any:
        return fn()

    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._on_inbound, host, port, ssl=self._tls.server,
                                                  ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                                                  reuse_port=True if self.dial_from_listen else None)
        port = self._server.sockets[0].getsockname()[1]
        if self.dial_from_listen and len(self._server.sockets) == 1:
            self._local = self._server.sockets[0].getsockname()[:2]
        self._addrs = self._announce or [addresses.format_address(_dialable_host(host), port, self.peer_id)]
        self._addrs_due = 0.0
        self._refresh_addrs()
        errors, reached = [], 0
        for addr in self.initial:
            if addr.peer_id == self.peer_id:
                continue
            try:
                await self._dial(addr)
                reached += 1
            except ChannelError as e:
                errors.append(f"{addr}: {e}")
        if errors and not reached:
            raise ChannelError("could not reach any initial peer: " + "; ".join(errors))
        self._spawn(self._maintain())

    async def _stop(self) -> None:
        self._stopping = True
        if getattr(self, "_server", None) is not None:
            self._server.close()
        for _ in range(10):  # ending a task may start another (a writer): until none is left
            for peer in list(self._peers.values()):
                peer.ch.close()
            tasks = [t for t in self._tasks if t is not asyncio.current_task()]
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=2.0)

    # --- records ------------------------------------------------------------------------------
    async def _put(self, rec: SignedRecord) -> str | None:
        return self._accept(rec, None)

    def _accept(self, rec: SignedRecord, source: str | None) -> str | None:
        """Store a record and, when it is new, flood it to every peer but `source`."""
        why = self.store.add(rec)
        if why is not None:
            return why
        for pid, peer in list(self._peers.items()):
            if pid != source and not peer.offer(rec):
                self._drop(peer, "too slow to take records")
        if rec.key == ADDR_KEY and rec.owner != self.peer_id:
            self._consider_dialing(rec)
        return None

    def _refresh_addrs(self) -> None:
        now = self.clock()
        if now >= self._addrs_due:
            self._addrs_due = now + ADDR_TTL / 3
            self._accept(sign(self.identity, ADDR_KEY, msgpack.packb(self._addrs[:MAX_ADDRS]), now + ADDR_TTL), None)

    # --- connections --------------------------------------------------------------------------
    async def _on_inbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's callback for an accepted (TLS-complete) connection: never raises."""
        if self._connections >= self.max_connections or self._stopping:
            writer.close()
            return
        task = asyncio.current_task()
        self._tasks.add(task)  # so that shutdown ends it too
        self._connections += 1
        try:
            ch = await accept(reader, writer, self.identity, self.swarm_key, max_frame=self.max_frame)
            if ch.service is None:
                await self._serve(ch)
            elif ch.service in self._services:
                await self._services[ch.service](ch)
            else:
                log.info("closed a connection from %s for an unknown service %r", ch.peer_id, ch.service)
        except ChannelError as e:
            log.info("inbound connection closed: %s", e)
        except asyncio.CancelledError:  # shutdown: end quietly (asyncio's streams would log a cancelled callback)
            pass
        except Exception as e:  # a bug here must not take the listener down
            log.warning("inbound connection failed: %s: %s", type(e).__name__, e)
        finally:
            self._tasks.discard(task)
            self._connections -= 1
            writer.close()

    async def _dial(self, addr: addresses.PeerAddress) -> None:
        """Connect to `addr` and serve the connection in the background; ChannelError if it fails."""
        key = str(addr)
        try:
            ch = await dial(addr.host, addr.port, addr.peer_id, self.identity, self._tls, self.swarm_key,
                            max_frame=self.max_frame, local=self._local)
        except ChannelError:
            self._failed[key] = self.clock()
            raise
        self._failed.pop(key, None)
        self._connections += 1
        self._spawn(self._serve_dialed(ch))

    async def _serve_dialed(self, ch: Channel) -> None:
        try:
            await self._serve(ch)
        except Exception as e:
            log.warning("connection to %s failed: %s: %s", ch.peer_id, type(e).__name__, e)
        finally:
            self._connections -= 1
            ch.close()

    async def _serve(self, ch: Channel) -> None:
        """Run one authenticated connection until it ends: sync, then receive and flood."""
        pid = ch.peer_id
        if self._stopping:
            return
        old = self._peers.get(pid)
        if old is not None:
            smaller_dials = self.peer_id < pid  # both ends keep the connection the smaller id dialed
            if ch.dialer != smaller_dials or old.ch.dialer == smaller_dials:
                ch.close()
                return
            self._drop(old, "replaced by a simultaneous connection")
        peer = Peer(ch, list(self.store.records()))
        self._peers[pid] = peer
        writer = self._spawn(self._write(peer))
        try:
            while True:
                msg = await ch.recv(IDLE_TIMEOUT)
                why = self._handle(msg, pid)
                if why is not None:
                    raise ChannelError(why)
        except ChannelError as e:
            self._count(str(e))
            log.info("connection with %s closed: %s", pid, e)
        finally:
            writer.cancel()
            if self._peers.get(pid) is peer:
                del self._peers[pid]
            ch.close()

    def _handle(self, msg: dict, source: str) -> str | None:
        """Apply one message from `source`; a reason to disconnect it, or None."""
        if msg["t"] != "rec":
            return None  # a type this version does not know: newer peers may send more
        records = parse_records(msg)
        if isinstance(records, str):
            return records
        for rec in records:
            why = self._accept(rec, source)
            if why == "bad signature":
                return f"forged record under {rec.key[:64]!r} (bad signature for {rec.owner[:64]})"
            if why not in (None, STALE):
                log.debug("refused a record from %s: %s", source, why)
        return None

    async def _write(self, peer: Peer) -> None:
        try:
            await peer.pump()
        except ChannelError as e:
            self._drop(peer, str(e))

    def _drop(self, peer: Peer, why: str) -> None:
        if not peer.ch.closed:
            self._count(why)
            log.info("dropping %s: %s", peer.ch.peer_id, why)
        peer.ch.close()

    def _count(self, why: str) -> None:
        kind = why.split(" (")[0].split(":")[0][:60]
        self.disconnects[kind] = self.disconnects.get(kind, 0) + 1

    # --- peer exchange and upkeep -------------------------------------------------------------
    def _dialed(self) -> int:
        return sum(1 for p in self._peers.values() if p.ch.dialer)

    def _consider_dialing(self, rec: SignedRecord) -> None:
        """Dial the owner of an address record if this node wants more outgoing connections."""
        pid = rec.owner
        if pid in self._peers or pid in self._dialing or self._dialed() + len(self._dialing) >= self.max_dialed:
            return
        try:
            addrs = msgpack.unpackb(rec.value, raw=False)
        except Exception:
            return
        if not isinstance(addrs, list):
            return
        now = self.clock()
        for text in addrs[:MAX_ADDRS]:
            try:
                addr = addresses.parse(text)
            except ValueError:
                continue
            if addr.peer_id == pid and now - self._failed.get(str(addr), -DIAL_BACKOFF) >= DIAL_BACKOFF:
                self._dialing.add(pid)
                self._spawn(self._dial_quietly(addr))
                return

    async def _dial_quietly(self, addr: addresses.PeerAddress) -> None:
        try:
            await self._dial(addr)
        except ChannelError as e:
            log.info("could not dial %s: %s", addr, e)
        finally:
            self._dialing.discard(addr.peer_id or "")

    async def _maintain(self) -> None:
        """Every TICK: drop expired records, refresh this node's addresses, dial more peers if few."""
        while True:
            await asyncio.sleep(TICK)
            try:
                self.store.purge()
                self._refresh_addrs()
                now = self.clock()
                self._failed = {a: t for a, t in self._failed.items() if now - t < DIAL_BACKOFF}
                if not self._peers and not self._dialing:
                    for addr in self.initial:
                        if addr.peer_id != self.peer_id and now - self._failed.get(str(addr), -DIAL_BACKOFF) >= DIAL_BACKOFF:
                            self._dialing.add(addr.peer_id or "")
                            self._spawn(self._dial_quietly(addr))
                if self._dialed() < self.max_dialed:
                    known = self.store.get(ADDR_KEY)
                    random.shuffle(known)
                    for rec in known:
                        if rec.owner != self.peer_id:
                            self._consider_dialing(rec)
            except Exception as e:  # upkeep must go on
                log.warning("node upkeep failed: %s: %s", type(e).__name__, e)
