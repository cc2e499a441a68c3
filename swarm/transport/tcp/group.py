"""Matchmaking and signed gathers for the TCP transport's all-reduce (`allreduce` does the exchange).

Announcing: a peer calling `all_reduce(group_key=K)` puts a signed record {"on": true} under
`announce_key(K)` (gossiped to every node) and, when the attempt ends, {"on": false}.

Leader: each peer takes the smallest peer id among the live "on" announcers of K, itself included,
leaving out banned peers, peers outside `allowed` (this round's plan) and peers that refused it or
could not be reached in this attempt. It is the same peer on every member once the records have
spread (milliseconds), and refusals settle the rest.

Messages, on connections opened for the service "avg" (`TcpNode.open_service`; not gossip, so bulk
parts never wait behind records, nor records behind parts):

    follower -> leader   {"t": "join", "key": K, "g": signed gather}
    leader -> follower   {"t": "refuse", "why": text, "retry": bool}      (retry: it is following
                         another leader or just stopped leading: look again; else leave it out)
    leader -> follower   {"t": "group", "id": 16 random bytes, "members": [ids], "gathers": [signed gathers]}
    member -> member     {"t": "mesh", "key": K, "id": group id}           (first message of a connection
                         opened by the earlier of two followers in member order, for the exchange)

The leader admits a joiner only if it is not banned, is in `allowed`, its gather is signed for its
(authenticated) id and K, announces this peer's vector length and `gather["plan"]`; it closes the group
at once when `group_size` members are there, or at `wait_until` (swarm time) with at least two.
Member order: the leader, then the others by peer id. A follower checks the group before anything
moves: it is in it, the leader is first, nobody twice, every gather signed by its member for K (and
with the swarm-key proof in a private swarm), its own gather the one it sent, same vector length, no
banned member, all in `allowed` naming its plan. A leader that sees a smaller leader appear, or
that abandons, sends its joiners "refuse" (retry) and follows it.

A signed gather: {"b": msgpack(gather), "n": vector length, "s": Ed25519 signature of
msgpack(["swarm-gather/1", K, peer id, n, b]), "m": HMAC with the swarm key of the same (private swarms)}.
The signature is over the bytes sent, so no re-encoding can break it; relabelling a gather as another
member's, or moving it to another group, breaks it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import numpy as np

from swarm.averaging import AveragingError, expectations
from swarm.codec import CODECS, open_group
from swarm.key import SwarmKey
from swarm.transport.base import ABANDONED, ReduceResult, TransportError
from swarm.transport.tcp.allreduce import Exchange, ExchangeError, Meter, frame_bytes, frame_cap, spans
from swarm.transport.tcp.channel import Channel, ChannelError
from swarm.transport.tcp.identity import Identity, verify
from swarm.transport.tcp.node import TcpNode

__all__ = ["Averager", "SERVICE", "sign_gather", "open_gather", "announce_key"]

log = logging.getLogger("swarm.transport.tcp")

SERVICE = "avg"
LABEL = "swarm-gather/1"
ANNOUNCE_PREFIX = "_swarm.tcp.avg."
ABANDON_POLL = 1.0      # seconds between asks whether to stop looking for a group
POLL = 0.05             # seconds between a leader's looks at its joiners and the announcements
RETRY = 0.2             # seconds before looking for a leader again after a "retry" refusal
FIRST_MESSAGE = 10.0    # seconds for a service connection's first message
MAX_GROUP = 256
READ_BUFFER = 2 << 20   # bytes a group connection's reader buffers before pausing the socket (about)


def announce_key(group_key: str) -> str:
    return ANNOUNCE_PREFIX + hashlib.sha256(group_key.encode()).hexdigest()[:40]


def _signed_bytes(group_key: str, peer_id: str, size: int, body: bytes) -> bytes:
    return msgpack.packb([LABEL, group_key, peer_id, size, body], use_bin_type=True)


def sign_gather(identity: Identity, swarm_key: SwarmKey | None, group_key: str, size: int, gather: Any) -> dict:
    body = msgpack.packb(gather, use_bin_type=True)
    signed = _signed_bytes(group_key, identity.peer_id, size, body)
    out = {"b": body, "n": size, "s": identity.sign(signed)}
    if swarm_key is not None:
        out["m"] = swarm_key.mac(b"swarm-gather", signed)
    return out


def open_gather(wrapper: object, peer_id: str, group_key: str, swarm_key: SwarmKey | None) -> tuple[Any, int] | None:
    """(gather, vector length) if `wrapper` is `peer_id`'s signed gather for `group_key`, else None."""
    if not isinstance(wrapper, dict) or not isinstance(wrapper.get("b"), bytes) or type(wrapper.get("n")) is not int:
        return None
    signed = _signed_bytes(group_key, peer_id, wrapper["n"], wrapper["b"])
    if not verify(peer_id, wrapper.get("s"), signed):
        return None
    if swarm_key is not None and not swarm_key.check(wrapper.get("m"), b"swarm-gather", signed):
        return None
    try:
        return msgpack.unpackb(wrapper["b"], raw=False, strict_map_key=False), wrapper["n"]
    except Exception:
        return None


@dataclass
class Joiner:
    ch: Channel
    wrapper: dict
    gather: Any
    watch: asyncio.Task | None = None


@dataclass
class Group:
    id: bytes
    members: list[str]
    wrappers: list[dict]
    gathers: list[Any]


@dataclass
class Attempt:
    key: str
    size: int                   # group_size
    vector: Any                 # np.ndarray (exact codec), or an `Int8Contribution` encoded once the group forms
    length: int                 # the vector's length (announced in the signed gather)
    gather: Any
    wrapper: dict
    wait_until: float           # swarm time: close the group with whoever is there
    give_up: float              # swarm time: no group by then -> fail
    timeout: float
    allowed: set[str] | None
    meter: Meter = field(default_factory=Meter)
    leading: bool = False
    formed: bool = False        # a group is fixed: no abandoning from here on
    over: bool = False
    joiners: dict[str, Joiner] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)
    channels: list[Channel] = field(default_factory=list)
    group: Group | None = None
    group_set: asyncio.Event = field(default_factory=asyncio.Event)
    mesh: dict[str, asyncio.Future] = field(default_factory=dict)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a joiner came or spoke: the leader looks now
    task: asyncio.Task | None = None
    stage: str = "starting"     # for diagnostics: matchmaking, connecting, exchanging, ending
    cancelled: bool = False

    @property
    def plan(self) -> Any:
        return self.gather.get("plan") if isinstance(self.gather, dict) else None


class Averager:
    """The all-reduce side of `TcpTransport`: runs on the node's event loop, called from any thread."""

    def __init__(self, node: TcpNode, identity: Identity, swarm_key: SwarmKey | None, clock: Callable[[], float]) -> None:
        self.node, self.identity, self.swarm_key, self.clock = node, identity, swarm_key, clock
        self.me = identity.peer_id
        self.banned: frozenset[str] = frozenset()
        self.clip_norm, self.max_norm_ratio, self.chunk_timeout = 1.0, None, 5.0
        self.allreduce_timeout = 60.0    # the exchange of a formed group (its parts at the link's rate) may take this long
        self.codec = "exact"
        self.vector_size: int | None = None
        self.attempt: Attempt | None = None
        self.traffic = (0, 0)            # (sent, received) not yet reported in a ReduceResult
        self._expirations: dict[str, float] = {}
        node.register_service(SERVICE, self._on_channel)

    def configure(self, *, vector_size: int, clip_norm: float, max_norm_ratio: float | None, chunk_timeout: float,
                  codec: str = "exact", allreduce_timeout: float = 60.0) -> None:
        if codec not in CODECS:
            raise ValueError(f"averaging codec {codec!r} is not one of {', '.join(CODECS)}")
        self.vector_size, self.clip_norm, self.max_norm_ratio, self.chunk_timeout, self.codec = \
            vector_size, clip_norm, max_norm_ratio, chunk_timeout, codec
        self.allreduce_timeout = allreduce_timeout

    def reducing(self) -> bool:
        a = self.attempt
        return a is not None and a.formed and not a.over

    # --- the caller's side (any thread) -----------------------------------------------------------
    def all_reduce(self, vector: np.ndarray, *, group_key: str, group_size: int, gather: Any, timeout: float,
                   wait_until: float | None = None, abandon: Callable[[], str | None] | None = None,
                   allowed: set[str] | None = None) -> ReduceResult:
        start = time.perf_counter()
        if hasattr(vector, "encode") and hasattr(vector, "size"):  # an int8 contribution (swarm.codec)
            vec, length = vector, int(vector.size)
        else:
            vec = np.array(vector, dtype=np.float64).reshape(-1)  # a copy: the caller may reuse its array
            length = len(vec)
        if vector is None or not length:
            raise TransportError("all-reduce failed: nothing to average (an empty vector)")
        if self.vector_size is not None and length != self.vector_size:
            raise TransportError(f"all-reduce failed: a vector of {length} values, averaging was opened for {self.vector_size}")
        now = self.clock()
        scheduled = max(wait_until or 0.0, now + 0.5)
        give_up = now + max(timeout, scheduled - now + 1.0)
        try:
            wrapper = sign_gather(self.identity, self.swarm_key, group_key, length, gather)
        except (TypeError, ValueError) as e:
            raise TransportError(f"all-reduce failed: the gather does not encode: {e}") from None
        a = Attempt(key=group_key, size=max(2, min(int(group_size), MAX_GROUP)), vector=vec, length=length, wrapper=wrapper,
                    gather=msgpack.unpackb(wrapper["b"], raw=False, strict_map_key=False),  # as the others read it
                    wait_until=scheduled, give_up=give_up, timeout=timeout,
                    allowed=None if allowed is None else set(allowed) | {self.me})
        future = asyncio.run_coroutine_threadsafe(self._run(a), self.node._runner.loop)
        # the coroutine bounds itself (the group by give_up, its exchange by allreduce_timeout): a backstop
        hard_end = time.monotonic() + (give_up - now) + max(timeout, self.allreduce_timeout) + 15.0
        try:
            while True:
                try:
                    vector_out, rejections = future.result(timeout=ABANDON_POLL)
                    break
                except FutureTimeout:
                    pass
                if not self.node._runner.loop.is_running():
                    raise TransportError("all-reduce failed: the transport was shut down")
                if time.monotonic() > hard_end:
                    log.warning("an all-reduce attempt did not end in time (stage: %s): cancelling it", a.stage)
                    self.node.call(self._cancel(a, force=True))
                    raise TransportError(f"all-reduce failed: it did not end in time (stage: {a.stage})")
                if abandon is None or a.formed:
                    continue
                why = abandon()
                if why and self.node.call(self._cancel(a)):
                    try:
                        future.result(timeout=5.0)  # its cleanup (connections closed, "off" announced)
                    except BaseException:
                        pass
                    raise TransportError(ABANDONED + why)
        except TransportError:
            raise
        except asyncio.CancelledError:
            raise TransportError("all-reduce failed: cancelled") from None
        except Exception as e:
            raise TransportError(f"all-reduce failed: {type(e).__name__}: {e}") from None
        finally:
            self.traffic = (self.traffic[0] + a.meter.sent, self.traffic[1] + a.meter.received)
        (sent, received), self.traffic = self.traffic, (0, 0)
        g = a.group
        bounds = dict(zip(g.members, spans(length, len(g.members))))
        return ReduceResult(vector=vector_out, gathered=dict(zip(g.members, g.gathers)), seconds=time.perf_counter() - start,
                            rejections=rejections, bytes_sent=sent, bytes_received=received, spans=bounds, leader=g.members[0])

    async def _cancel(self, a: Attempt, force: bool = False) -> bool:
        """(On the loop) end an attempt that has not formed a group; False if it already has (unless `force`)."""
        if a.over or (a.formed and not force):
            return False
        a.cancelled = True  # seen by `_run` if it has not started yet
        if a.task is not None:
            a.task.cancel()
        return True

    # --- one attempt (on the loop) ---------------------------------------------------------------
    async def _run(self, a: Attempt) -> tuple[np.ndarray, dict[str, str]]:
        a.task = asyncio.current_task()
        if a.cancelled:
            raise asyncio.CancelledError
        self.node._tasks.add(a.task)  # shutdown cancels it with the node's own tasks
        a.task.add_done_callback(self.node._tasks.discard)
        old = self.attempt
        if old is not None and not old.over and old.task is not None:  # an abandoned attempt still ending
            old.task.cancel()
        if old is not None:
            try:  # its "off" announcement must not follow this attempt's "on"
                await asyncio.wait_for(old.finished.wait(), 10.0)
            except asyncio.TimeoutError:
                pass
        self.attempt = a
        try:
            await self._announce(a, True)
            a.stage = "matchmaking"
            channels = await self._form(a)
            a.stage = "exchanging"
            g = a.group
            for ch in channels.values():
                ch.max_frame = min(ch.max_frame, frame_cap())
                reader = getattr(ch, "reader", None)
                if reader is not None and getattr(reader, "_limit", 0) < READ_BUFFER:
                    # asyncio's StreamReader pauses the socket at 2 x its limit (64 KiB by default): a 1 MiB part
                    # would stop and restart reading several times; the frame cap still bounds what is buffered
                    reader._limit = READ_BUFFER
            gathers = [x if isinstance(x, dict) else {} for x in g.gathers]
            expects = expectations(gathers, self.clip_norm, self.max_norm_ratio)
            try:  # the int8 codec encodes only now, with the group's shared scales
                vector, wire = open_group(self.codec, a.vector, gathers, expects)
            except AveragingError as e:
                raise TransportError(f"all-reduce failed: {e}") from None
            # bounded by allreduce_timeout, not by a.timeout (the wait for the group, which a peer that trained up to
            # its deadline gets as only 2 x matchmaking_time + 5 s): on a slow line the parts take longer than that
            exchange = Exchange(vector, g.members, self.me, channels, wire.expects, a.meter, self.chunk_timeout,
                                self.allreduce_timeout, wire=wire)
            try:
                return await exchange.run()
            except ExchangeError as e:
                log.warning("all-reduce of group %s (leader %s) failed: %s", g.id.hex()[:8], g.members[0], e)
                raise TransportError(f"all-reduce failed: {e}") from None
        finally:
            a.stage = "ending"
            a.over = True
            if self.attempt is a:
                self.attempt = None
            for j in a.joiners.values():
                if j.watch is not None:
                    j.watch.cancel()
            for ch in a.channels:
                ch.close()
            for fut in a.mesh.values():
                if not fut.done():
                    fut.cancel()
            try:
                await self._announce(a, False)
            except Exception:
                pass
            a.finished.set()

    async def _announce(self, a: Attempt, on: bool) -> None:
        key = announce_key(a.key)
        exp = max(a.give_up + 5.0 if on else self.clock() + 10.0, self._expirations.get(key, 0.0) + 1e-3)
        self._expirations[key] = exp
        why = await self.node.publish(key, msgpack.packb({"on": on}), exp)
        if why is not None:
            log.info("all-reduce announcement under %s not stored: %s", key, why)

    def _leader(self, a: Attempt) -> str:
        candidates = {self.me}
        for rec in self.node.store.get(announce_key(a.key)):
            pid = rec.owner
            if pid in self.banned or pid in a.excluded or (a.allowed is not None and pid not in a.allowed):
                continue
            try:
                value = msgpack.unpackb(rec.value, raw=False)
            except Exception:
                continue
            if isinstance(value, dict) and value.get("on") is True:
                candidates.add(pid)
        return min(candidates)

    def _no_group(self, a: Attempt) -> None:
        if self.clock() >= a.give_up:
            raise TransportError("all-reduce failed: no group formed before the deadline")

    async def _form(self, a: Attempt) -> dict[str, Channel]:
        """Lead or follow until a group is fixed; the connections to every other member, by peer id."""
        while True:
            self._no_group(a)
            leader = self._leader(a)
            if leader == self.me:
                channels = await self._lead(a)
            else:
                channels = await self._follow(a, leader)
            if channels is not None:
                return channels

    # --- leading ---------------------------------------------------------------------------------
    def _refuse(self, a: Attempt | None, pid: str, msg: dict) -> tuple[str, bool] | None:
        if a is None or a.over or a.key != msg.get("key"):
            return "not looking for this group", False
        if a.formed:
            return "its group has formed", False
        if not a.leading:
            return "not leading this group", True
        if pid in self.banned:
            return "banned", False
        if a.allowed is not None and pid not in a.allowed:
            return "not in this round's plan", False
        opened = open_gather(msg.get("g"), pid, a.key, self.swarm_key)
        if opened is None:
            return "its gather is not signed for this group", False
        gather, size = opened
        if size != a.length:
            return f"it averages {size} values, this peer {a.length}", False
        if a.allowed is not None and (not isinstance(gather, dict) or gather.get("plan") != a.plan):
            return "it names another plan", False
        if len([j for j in a.joiners if j != pid]) + 1 >= a.size:
            return "the group is full", False
        return None

    async def _on_join(self, ch: Channel, msg: dict) -> None:
        a, pid = self.attempt, ch.peer_id
        refusal = self._refuse(a, pid, msg)
        if refusal is not None:
            why, retry = refusal
            if not retry:
                log.info("refused %s in matchmaking: %s", pid, why)
            try:
                await asyncio.wait_for(ch.send({"t": "refuse", "why": why, "retry": retry}), 5.0)
            except (ChannelError, asyncio.TimeoutError):
                pass
            return
        a.meter.received += _size(msg)
        old = a.joiners.pop(pid, None)
        if old is not None:
            old.ch.close()
        joiner = Joiner(ch, msg["g"], open_gather(msg["g"], pid, a.key, self.swarm_key)[0])
        joiner.watch = asyncio.ensure_future(ch.recv())  # anything but silence (it left, or broke protocol) drops it
        joiner.watch.add_done_callback(lambda _: a.arrived.set())
        a.joiners[pid] = joiner
        a.arrived.set()  # the leader assembles at once when this fills the group (not at its next POLL)
        a.channels.append(ch)
        await a.finished.wait()  # the connection is the attempt's until it ends

    async def _lead(self, a: Attempt) -> dict[str, Channel] | None:
        a.leading = True
        try:
            while True:
                a.arrived.clear()  # before looking: what arrives from here on wakes the wait below
                for pid, j in list(a.joiners.items()):
                    if j.watch.done():
                        _settle(j.watch)
                        j.ch.close()
                        del a.joiners[pid]
                        log.info("%s left the group it was joining", pid)
                full = len(a.joiners) + 1 >= a.size
                if full or (a.joiners and self.clock() >= a.wait_until):
                    return await self._assemble(a)
                if self._leader(a) != self.me:  # a smaller leader appeared: follow it, and send the joiners there
                    await self._disband(a, "this peer follows another leader now")
                    return None
                self._no_group(a)
                try:  # every POLL (announcements, wait_until), or at once when a joiner arrives or leaves
                    await asyncio.wait_for(a.arrived.wait(), POLL)
                except asyncio.TimeoutError:
                    pass
        except BaseException:
            if not a.formed:
                await self._disband(a, "the leader stopped looking for a group")
            raise
        finally:
            a.leading = False

    async def _disband(self, a: Attempt, why: str) -> None:
        joiners, a.joiners = list(a.joiners.values()), {}
        for j in joiners:
            if j.watch is not None:
                j.watch.cancel()
        for j in joiners:
            try:
                await asyncio.wait_for(j.ch.send({"t": "refuse", "why": why, "retry": True}), 1.0)
            except (ChannelError, asyncio.TimeoutError, asyncio.CancelledError):
                pass
            j.ch.close()

    def group_message(self, a: Attempt, group: Group) -> dict:
        """What the leader sends its followers (a method, so that tests can play a lying leader)."""
        return {"t": "group", "id": group.id, "members": group.members, "gathers": group.wrappers}

    async def _assemble(self, a: Attempt) -> dict[str, Channel]:
        a.formed = True
        watches = [j.watch for j in a.joiners.values()]
        for w in watches:
            w.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        for pid, j in list(a.joiners.items()):  # a joiner that spoke or left just now is not in the group
            if not j.watch.cancelled():
                _settle(j.watch)
                j.ch.close()
                del a.joiners[pid]
        others = sorted(a.joiners)[:a.size - 1]
        if not others:
            a.formed = False
            return None
        members = [self.me] + others
        group = Group(id=secrets.token_bytes(16), members=members,
                      wrappers=[a.wrapper] + [a.joiners[p].wrapper for p in others],
                      gathers=[a.gather] + [a.joiners[p].gather for p in others])
        a.group = group
        a.group_set.set()
        msg = self.group_message(a, group)
        try:
            await asyncio.wait_for(asyncio.gather(*(a.meter.send(a.joiners[p].ch, msg) for p in others)),
                                   max(self.chunk_timeout, 5.0))
        except (ChannelError, asyncio.TimeoutError) as e:
            raise TransportError(f"all-reduce failed: could not tell the group it formed: {e}") from None
        log.info("formed group %s of %d as its leader: %s", group.id.hex()[:8], len(members), ", ".join(members))
        return {p: a.joiners[p].ch for p in others}

    # --- following -------------------------------------------------------------------------------
    async def _follow(self, a: Attempt, leader: str) -> dict[str, Channel] | None:
        try:
            ch = await self.node.open_service(leader, SERVICE, timeout=5.0)
        except ChannelError as e:
            log.info("cannot reach %s to join its group: %s", leader, e)
            a.excluded.add(leader)
            return None
        a.channels.append(ch)
        try:
            await asyncio.wait_for(a.meter.send(ch, {"t": "join", "key": a.key, "g": a.wrapper}), 5.0)
            reply = asyncio.ensure_future(a.meter.recv(ch))
            try:
                while not reply.done():
                    await asyncio.wait({reply}, timeout=POLL)
                    if not reply.done():
                        self._no_group(a)
            finally:
                if not reply.done():
                    reply.cancel()
            msg = reply.result()
        except (ChannelError, asyncio.TimeoutError) as e:
            log.info("leader %s closed the connection: %s", leader, e or "timed out")
            a.excluded.add(leader)
            ch.close()
            return None
        except BaseException:
            ch.close()
            raise
        if msg["t"] == "refuse":
            ch.close()
            if msg.get("retry") is True:
                await asyncio.sleep(RETRY)
            else:
                log.info("%s refused this peer in matchmaking: %s", leader, str(msg.get("why"))[:200])
                a.excluded.add(leader)
            return None
        if msg["t"] != "group":
            raise TransportError(f"all-reduce failed: leader {leader} sent {msg['t'][:20]!r} instead of a group")
        a.formed = True
        group = self._check_group(a, leader, msg)
        a.group = group
        a.group_set.set()
        log.info("joined group %s of %d led by %s", group.id.hex()[:8], len(group.members), leader)
        a.stage = "connecting"
        return await self._mesh(a, {leader: ch})

    def _check_group(self, a: Attempt, leader: str, msg: dict) -> Group:
        gid, members, wrappers = msg.get("id"), msg.get("members"), msg.get("gathers")
        if not (isinstance(gid, bytes) and len(gid) == 16 and isinstance(members, list) and isinstance(wrappers, list)
                and 2 <= len(members) <= a.size and len(wrappers) == len(members)
                and all(isinstance(p, str) for p in members) and len(set(members)) == len(members)
                and members[0] == leader and self.me in members):
            raise TransportError(f"all-reduce failed: leader {leader} sent a malformed group")
        gathers, forged = [], []
        for pid, w in zip(members, wrappers):
            opened = open_gather(w, pid, a.key, self.swarm_key)
            if opened is None or opened[1] != a.length or (pid == self.me and w != a.wrapper):
                forged.append(pid)
                gathers.append(None)
            else:
                gathers.append(opened[0])
        if forged:
            raise TransportError(f"all-reduce failed: the gather of member(s) {', '.join(forged)} is not signed by them "
                                 f"for this group (or not for this vector); group led by {leader}")
        banned = sorted(set(members) & self.banned)
        if banned:
            raise TransportError(f"all-reduce failed: group includes banned peer(s) {banned}")
        if a.allowed is not None:
            outside = {p: ("not in this round's plan" if p not in a.allowed else
                           f"names another plan ({str(g.get('plan') if isinstance(g, dict) else None)[:16]})")
                       for p, g in zip(members, gathers)
                       if p not in a.allowed or not isinstance(g, dict) or g.get("plan") != a.plan}
            if outside:
                why = "; ".join(f"{p}: {w}" for p, w in outside.items())
                raise TransportError(f"all-reduce failed: group includes member(s) outside this round's plan ({why})")
        return Group(id=gid, members=members, wrappers=wrappers, gathers=gathers)

    async def _mesh(self, a: Attempt, channels: dict[str, Channel]) -> dict[str, Channel]:
        """Connections to the other followers: the earlier of two (in member order) dials the later."""
        g = a.group
        mine = g.members.index(self.me)
        later = g.members[mine + 1:]
        earlier = g.members[1:mine]
        for p in earlier:
            a.mesh.setdefault(p, asyncio.get_running_loop().create_future())

        async def dial(p: str) -> None:
            ch = await self.node.open_service(p, SERVICE, timeout=5.0)
            a.channels.append(ch)
            await asyncio.wait_for(a.meter.send(ch, {"t": "mesh", "key": a.key, "id": g.id}), 5.0)
            channels[p] = ch

        async def accept(p: str) -> None:
            channels[p] = await a.mesh[p]

        wait = max(self.chunk_timeout, 5.0)
        try:
            await asyncio.wait_for(asyncio.gather(*(dial(p) for p in later), *(accept(p) for p in earlier)), wait)
        except (ChannelError, asyncio.TimeoutError) as e:
            missing = [p for p in g.members if p != self.me and p not in channels]
            raise TransportError(f"all-reduce failed: no connection to member(s) {', '.join(missing)} "
                                 f"({e or 'timed out'})") from None
        return channels

    # --- inbound connections (on the loop) --------------------------------------------------------
    async def _on_channel(self, ch: Channel) -> None:
        try:
            msg = await ch.recv(FIRST_MESSAGE)
        except ChannelError:
            return
        if msg["t"] == "join":
            await self._on_join(ch, msg)
        elif msg["t"] == "mesh":
            await self._on_mesh(ch, msg)

    async def _on_mesh(self, ch: Channel, msg: dict) -> None:
        a = self.attempt
        if a is None or a.key != msg.get("key"):
            return
        try:  # the leader's group message may reach this peer after the other follower's connection
            await asyncio.wait_for(a.group_set.wait(), max(self.chunk_timeout, 5.0))
        except asyncio.TimeoutError:
            return
        g, pid = a.group, ch.peer_id
        fut = a.mesh.get(pid)
        if g.id != msg.get("id") or fut is None or fut.done() or a.over:
            log.info("refused a connection from %s for another group", pid)
            return
        a.meter.received += _size(msg)
        a.channels.append(ch)
        fut.set_result(ch)
        await a.finished.wait()


def _settle(task: asyncio.Future) -> None:
    """Retrieve a finished watch's outcome (asyncio would log an exception nobody asked for)."""
    if task.done() and not task.cancelled():
        task.exception()


def _size(msg: dict) -> int:
    return frame_bytes(msg)
