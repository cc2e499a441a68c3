"""hivemind's averager, hardened for untrusted peers (used only by `hivemind_dht`).

- Streamed messages longer than MAX_MESSAGE_BYTES are refused after their length header.
- Every reducer checks each sender's part against what the sender announced (`swarm.averaging`)
  and sums a rejection marker in place of a part that fails, so the whole group reads the verdict.
- Banned peers are refused in matchmaking, as leader and as follower.
- Only members of this round's plan, announcing this round's plan id, are admitted to a group (as
  follower, and as leader: a leader that assembles a group with an outsider is not followed again this
  attempt; plans may differ for a moment, so the next attempt checks everyone afresh); hivemind's
  unsigned gather fields (bandwidth, mode), which a leader relays and could rewrite to reduce
  everything itself, must be the ones every swarm peer uses, and the group's leader is named.
- State download is bounded: bytes (the state's known size), time (one deadline for the whole
  download, one per source, cancelled when passed), and sources: declared priorities are unsigned,
  so they only filter (>= the round wanted), never order; members of this peer's own groups are asked
  first, the rest in random order; a source that is too slow or too big is not asked again for a while.
- State is never downloaded from a banned or distrusted peer, and the caller learns who served it.
- The group size follows the round plan, and the reducer sums in float64.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import threading
import time
from typing import AsyncIterator

import numpy as np
import torch

import hivemind
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, azip
from hivemind.utils.crypto import RSAPublicKey
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration

from swarm.averaging import check_part, expectations, marker_part
from swarm.key import SwarmKey
from swarm.transport import hivemind_traffic
from swarm.transport.base import StateProvider, TransportError

MAX_MESSAGE_BYTES = 32 << 20  # largest message any peer may send us: parts are 512 KiB, state chunks 4 MiB
SLOW_SOURCE = 60.0  # seconds a state source that was too slow or too big is not asked again
_log = logging.getLogger("hivemind.swarm")


class OversizedMessage(Exception):
    pass


async def _receive_raw_data(reader) -> bytes:
    """hivemind reads a streamed message's 8-byte length and then that many bytes, whatever the length:
    a peer could make us buffer gigabytes. Refuse anything over MAX_MESSAGE_BYTES before reading it."""
    header = await reader.readexactly(P2P.HEADER_LEN)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > MAX_MESSAGE_BYTES:
        _log.warning("refused a %d-byte message (limit %d bytes) before reading it", length, MAX_MESSAGE_BYTES)
        raise OversizedMessage(f"message of {length} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    return await reader.readexactly(length)


P2P.receive_raw_data = staticmethod(_receive_raw_data)  # before any DHT/averager process forks


def _proof_parts(wrapper: dict, p2p_id: bytes) -> tuple[bytes, ...]:
    return (b"swarm-member", MSGPackSerializer.dumps(wrapper["g"]), wrapper["k"], wrapper["s"], p2p_id)


def member_proof(key: SwarmKey, wrapper: dict, p2p_id: bytes) -> bytes:
    """HMAC with the swarm key over a signed announcement and the libp2p id it is sent from."""
    return key.mac(*_proof_parts(wrapper, p2p_id))


def is_member(key: SwarmKey | None, user_gathered: bytes, p2p_id: bytes) -> bool:
    """Does this announcement (hivemind's user part of a gather) prove membership of the swarm of `key`?"""
    if key is None:
        return True
    try:
        wrapper = MSGPackSerializer.loads(user_gathered)
        return isinstance(wrapper, dict) and key.check(wrapper.get("h"), *_proof_parts(wrapper, p2p_id))
    except Exception:
        return False


def owner_of(public_key_marker: bytes) -> str:
    """A peer's id in swarm records: a short hash of its RSA public key (so it can't be claimed by others)."""
    return hashlib.sha256(public_key_marker).hexdigest()[:16]


def signed_owner(wrapper: object, p2p_id: str, group_key: str) -> str | None:
    """The swarm id whose RSA key signed this announcement (our wrapper {g, k, s}) for its libp2p id and this
    group, or None."""
    try:
        key, sig, g = wrapper["k"], wrapper["s"], wrapper["g"]
        m = re.fullmatch(rb"\[owner:(.+)\]", key, re.S)
        body = MSGPackSerializer.dumps(g) + b"|" + p2p_id.encode() + b"|" + group_key.encode()
        if m and isinstance(g, dict) and RSAPublicKey.from_bytes(m.group(1)).verify(body, sig):
            return owner_of(key)
    except Exception:
        pass
    return None


SWARM_HEADER = (None, 0)  # hivemind's (bandwidth, mode) in every swarm peer's gather: default bandwidth, NODE


def _header(gathered_bytes: bytes) -> tuple:
    try:
        bandwidth, mode, _ = MSGPackSerializer.loads(gathered_bytes)
        return bandwidth, mode
    except Exception:
        return ("unreadable",)


def _user_part(gathered_bytes: bytes) -> bytes:
    try:
        return MSGPackSerializer.loads(gathered_bytes)[2]
    except Exception:
        return b""


def _announced(gathered_bytes: bytes) -> dict:
    """A member's own gather (our signed wrapper), as hivemind relays it; {} if unreadable."""
    try:
        _, _, user = MSGPackSerializer.loads(gathered_bytes)
        wrapper = MSGPackSerializer.loads(user)
        return wrapper.get("g", {}) if isinstance(wrapper, dict) and isinstance(wrapper.get("g"), dict) else {}
    except Exception:
        return {}


class _CheckedReducer(TensorPartReducer):
    """A reducer that checks every sender's part against what it announced before summing it.

    A sender whose part fails is named in the log and, from that part on, represented by a rejection
    marker (see `swarm.averaging`): every member reads the verdict from the averaged check lanes."""

    def __init__(self, part_shapes, num_senders, *, starts, total, expects, names, on_reject):
        super().__init__(part_shapes, num_senders)
        self.starts, self.total, self.expects, self.names, self.on_reject = starts, total, expects, names, on_reject
        self.rejected: dict[int, str] = {}
        self.sumsq = [0.0] * num_senders

    def vet(self, sender: int, part_index: int, part: torch.Tensor, weight: float) -> torch.Tensor:
        if not (0 <= sender < self.num_senders and 0 <= part_index < self.num_parts):
            raise BannedException(f"sender {sender} sent part {part_index} of {self.num_parts}")
        shape = self.part_shapes[part_index]
        reason = self.rejected.get(sender)
        if reason is None:
            if weight != 1.0:
                reason = f"it sent averaging weight {weight!r} (the swarm weighs by tokens, inside the vector)"
            elif part.dtype != torch.float64 or tuple(part.shape) != tuple(shape):
                reason = f"it sent a {part.dtype} part of shape {tuple(part.shape)}, expected float64 {tuple(shape)}"
            else:
                reason, self.sumsq[sender] = check_part(part.numpy(), self.starts[part_index], self.total,
                                                        self.expects[sender], self.sumsq[sender])
            if reason is not None:
                self.rejected[sender] = reason
                self.on_reject(self.names[sender], part_index, reason)
        if reason is None:
            return part
        expect = self.expects[sender]
        return torch.from_numpy(marker_part(int(np.prod(shape)), self.starts[part_index], self.total,
                                            expect.salt if expect else 0)).reshape(shape)

    async def accumulate_part(self, sender_index, part_index, tensor_part, weight=1.0):
        part = self.vet(sender_index, part_index, tensor_part, weight)
        return await super().accumulate_part(sender_index, part_index, part, weight=1.0)


class _CheckedRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce with a `_CheckedReducer`, and deltas computed against the
    part that was actually summed (a wrongly shaped part gets a marker's delta, not an exception)."""

    def __init__(self, *, announced: dict, clip_norm: float, max_norm_ratio: float | None, on_reject, **kwargs):
        super().__init__(**kwargs)
        me = self.ordered_peer_ids.index(self.peer_id)
        c = self.tensor_part_container
        start = sum(len(part) for j in range(me) for part, _ in c._input_parts_by_peer[j])
        starts = []
        for part in self.parts_for_local_averaging:
            starts.append(start)
            start += len(part)
        self.tensor_part_reducer.finished.set()  # the stock reducer is replaced before it sees any part
        self.tensor_part_reducer = _CheckedReducer(
            tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids),
            starts=starts, total=c.total_size, names=[p.to_base58() for p in self.sender_peer_ids],
            expects=expectations([announced.get(p, {}) for p in self.sender_peer_ids], clip_norm, max_norm_ratio),
            on_reject=on_reject)
        self.sending, self.streams = asyncio.Event(), 0  # senders' streams still returning averaged deltas
        self.sending.set()

    async def rpc_aggregate_part(self, stream, context):
        """hivemind's, and `sending` is clear while any sender's averaged deltas are still going out."""
        self.streams += 1
        self.sending.clear()
        try:
            async for message in super().rpc_aggregate_part(stream, context):
                yield message
        finally:
            self.streams -= 1
            if not self.streams:
                self.sending.set()

    async def deltas_sent(self) -> None:
        """Until the last averaged delta this reducer owes has been written (at most `reducer_timeout`), so that a
        round's `bytes_sent` holds them all rather than the next round's."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.sending.wait(), self.reducer_timeout)

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        part_index = 0
        reducer = self.tensor_part_reducer
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                stream, max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    summed = reducer.vet(sender_index, part_index, tensor_part, weight)
                    averaged_part = await TensorPartReducer.accumulate_part(reducer, sender_index, part_index, summed)
                    part_index += 1
                except BannedException:
                    break
                delta = await loop.run_in_executor(
                    None, lambda: serialize_torch_tensor(averaged_part - summed, part_compression))
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=delta)
        finally:
            if part_index != reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class SwarmAverager(DecentralizedAverager):
    """A DecentralizedAverager whose group size follows the round plan, whose reducers check every
    sender, which refuses banned peers, and whose state is ours."""

    state_provider: StateProvider | None = None
    clip_norm: float = 1.0
    max_norm_ratio: float | None = None
    swarm_key: SwarmKey | None = None

    def run(self) -> None:
        # a dying p2pd (Ctrl-C reaches the whole process group) makes hivemind's shutdown raise in a
        # thread: log it with hivemind's messages instead of printing a traceback on the console
        threading.excepthook = lambda a: logging.getLogger("hivemind").warning(
            "averager thread ended: %s: %s", a.exc_type.__name__, a.exc_value)
        # hivemind's reducer sums parts in `torch.zeros(shape)`, i.e. the default dtype: float32
        # would truncate our exact float64 fixed-point sums. This runs in the averager's own process.
        torch.set_default_dtype(torch.float64)
        hivemind_traffic.install()  # bytes_sent / bytes_received of each round
        super().run()

    async def _take_traffic(self, future) -> None:
        future.set_result(hivemind_traffic.take())

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
        self._call("_set_target_group_size", size)

    def _call(self, method: str, *args):
        from hivemind.utils.mpfuture import MPFuture

        future = MPFuture()
        self._outer_pipe.send((method, list(args), dict(future=future)))
        return future.result(timeout=10)

    # --- checked reduction (runs in the averager's process) ----------------------------------------
    def _on_reject(self, sender: str, part_index: int, reason: str) -> None:
        _log.warning("rejected the contribution of %s (part %d): %s", sender, part_index, reason)
        self._rejections()[sender] = reason

    def _rejections(self) -> dict[str, str]:
        if not hasattr(self, "_rejected"):
            self._rejected = {}
        return self._rejected

    async def _take_rejections(self, future) -> None:
        future.set_result({**self._report(), "rejections": dict(self._rejections())})
        self._rejections().clear()
        self._report().clear()

    def _report(self) -> dict:
        if not hasattr(self, "_last_report"):
            self._last_report = {}
        return self._last_report

    # --- this round's plan (runs in the averager's process) ------------------------------------------------
    def _outsiders(self) -> set:
        """Peers refused for this round: a leader that rewrote other members' gather fields (only a cheat does)."""
        if not hasattr(self, "_refused"):
            self._refused = set()
        return self._refused

    def _off_plan(self) -> set:
        """Peers refused in this attempt only: they named another plan, or were not in ours, or led a group that
        held such members. Plans are derived from each peer's own view of the DHT and may differ for a moment;
        once every member replanned they agree, so the next attempt (a new plan) hears them again. Remembering
        such a refusal for the whole round would leave two honest peers refusing each other until it ends (it
        never does: neither can commit it without the other)."""
        if not hasattr(self, "_refused_now"):
            self._refused_now = set()
        return self._refused_now

    def _leader(self) -> str | None:
        leader = getattr(self._matchmaking, "_swarm_leader", None)
        return leader.to_base58() if leader is not None else None

    async def _set_round(self, allowed: list[str], plan_id: str, group_key: str, future) -> None:
        if getattr(self, "_round", (None, None, None))[2] != group_key:
            self._outsiders().clear()  # a new round: refusals of the last one are forgotten
        self._off_plan().clear()  # a new attempt, maybe a new plan on either side: every member is checked afresh
        self._round = (frozenset(allowed), plan_id, group_key)
        self._hook_matchmaking()
        future.set_result(True)

    def _why_outside(self, raw_user: bytes, p2p_id: str) -> str | None:
        """Why a member (its announcement, relayed by hivemind) may not be in this round's group, or None."""
        allowed, plan_id, group_key = getattr(self, "_round", (None, None, None))
        if allowed is None:
            return None
        try:
            wrapper = MSGPackSerializer.loads(raw_user)
        except Exception:
            wrapper = None
        owner = signed_owner(wrapper, p2p_id, group_key)
        if owner is None:
            return "its announcement is not signed for this group"
        if owner not in allowed:
            return f"peer {owner} is not in this round's plan"
        if wrapper["g"].get("plan") != plan_id:
            return f"peer {owner} names another plan ({str(wrapper['g'].get('plan'))[:16]}, this peer's {plan_id})"
        return None

    def _outside_plan(self, group_info) -> dict[str, str]:
        out = {}
        for pid, raw in zip(group_info.peer_ids, group_info.gathered):
            if pid != self.peer_id:
                why = self._why_outside(_user_part(raw), pid.to_base58())
                if why:
                    out[pid.to_base58()] = why
        return out

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        banned = self._banned_ids() & set(group_info.peer_ids)
        if banned:
            raise TransportError(f"group includes banned peer(s) {sorted(p.to_base58() for p in banned)}")
        strangers = [pid for pid, raw in zip(group_info.peer_ids, group_info.gathered)
                     if pid != self.peer_id and not is_member(self.swarm_key, _user_part(raw), pid.to_base58().encode())]
        if strangers:  # before any part is sent or accepted
            _log.warning("refused a group with non-member(s) %s (no valid swarm key proof)", [p.to_base58() for p in strangers])
            raise TransportError(f"group includes non-member(s) {sorted(p.to_base58() for p in strangers)}")
        leader = self._leader()
        rewritten = [pid.to_base58() for pid, raw in zip(group_info.peer_ids, group_info.gathered)
                     if _header(raw) != SWARM_HEADER]
        if rewritten:  # part sizes and modes come from these unsigned fields: only a leader could change another's
            _log.warning("refused a group whose unsigned gather fields (bandwidth, mode) of %s are not a swarm peer's: "
                         "rewritten by the group's leader %s", rewritten, leader)
            if leader and leader != self.peer_id.to_base58():
                self._outsiders().add(PeerID.from_base58(leader))
            raise TransportError(f"group's leader {leader} rewrote the gather of member(s) {', '.join(rewritten)}")
        outside = self._outside_plan(group_info)
        if outside:
            self._off_plan().update(PeerID.from_base58(p) for p in outside)
            if leader and leader != self.peer_id.to_base58() and leader not in outside:
                self._off_plan().add(PeerID.from_base58(leader))  # it let them in: don't follow it again this attempt
            why = "; ".join(f"{p}: {w}" for p, w in outside.items())
            _log.warning("refused a group with member(s) outside this round's plan (leader %s): %s", leader, why)
            raise TransportError(f"group includes member(s) outside this round's plan ({why})")
        announced = {pid: _announced(raw) for pid, raw in zip(group_info.peer_ids, group_info.gathered)}
        runner = _CheckedRunner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                group_id=group_id, ordered_peer_ids=group_info.peer_ids, announced=announced,
                                clip_norm=self.clip_norm, max_norm_ratio=self.max_norm_ratio,
                                on_reject=self._on_reject, **kwargs)
        self._running_groups[group_id].set_result(runner)
        c, start, spans = runner.tensor_part_container, 0, []
        for j, pid in enumerate(group_info.peer_ids):
            size = sum(len(part) for part, _ in c._input_parts_by_peer[j])
            spans.append((pid.to_base58(), start, start + size))
            start += size
        self._report().update(spans=spans, leader=leader)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = hivemind.utils.get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
        await runner.deltas_sent()

    # --- state download (runs in the averager's process) ------------------------------------------------
    async def _distrust(self, peer: str, future) -> None:
        self._distrusted = getattr(self, "_distrusted", set()) | {PeerID.from_base58(peer)}
        future.set_result(True)

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None, min_priority: float = 0.0,
                              skip: tuple[str, ...] = (), max_bytes: int = 1 << 62, first: tuple[str, ...] = ()):
        """hivemind's, bounded: at most `max_bytes` from a source, all of it within `timeout` seconds; only from
        peers declaring a priority (swarm: the round of their state) of at least `min_priority` or listed in
        `first` (asked first), never from the peers in `skip`."""
        from hivemind.utils.mpfuture import MPFuture

        future = MPFuture()
        self._outer_pipe.send(("_load_state_from_peers", [], dict(timeout=timeout, future=future, min_priority=min_priority,
                                                                    skip=tuple(skip), max_bytes=max_bytes, first=tuple(first))))
        return future.result(timeout=None if timeout is None else timeout + 5.0) if wait else future

    async def _load_state_from_peers(self, future, timeout=None, min_priority=0.0, skip=(), max_bytes=1 << 62, first=()):
        """Ask sources one at a time until one serves a whole state; the caller validates it (and may reject
        the source). Never a banned, distrusted, skipped or recently too slow/too big source."""
        deadline = time.monotonic() + (timeout if timeout is not None else 60.0)
        chunk_timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            key_manager = self._matchmaking.group_key_manager
            found, _ = self.dht.get(f"{key_manager.prefix}.all_averagers", latest=True) or ({}, None)
            now = time.monotonic()
            slow = getattr(self, "_slow", {})
            avoid = self._banned_ids() | getattr(self, "_distrusted", set()) | {self.peer_id}
            avoid |= {PeerID.from_base58(p) for p in skip} | {p for p, until in slow.items() if until > now}
            declared = {PeerID(p) for p, info in (found.items() if isinstance(found, dict) else ())
                        if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int))
                        and info.value >= min_priority}
            preferred = []
            for p in first:
                try:
                    preferred.append(PeerID.from_base58(p))
                except Exception:
                    pass
            rest = sorted(declared - set(preferred) - avoid, key=lambda _: random.random())
            for peer in [p for p in dict.fromkeys(preferred) if p not in avoid] + rest:
                left = deadline - time.monotonic()
                if left <= 0.5:
                    break
                try:
                    got = await asyncio.wait_for(self._download_from(peer, chunk_timeout, max_bytes), left)
                    if got is not None:
                        future.set_result((*got, peer.to_base58()))
                        return
                except Exception as e:  # too slow, too big, gone: ask the others, and not this one for a while
                    self._slow = {**{p: t for p, t in slow.items() if t > now}, peer: time.monotonic() + SLOW_SOURCE}
                    _log.info("could not download state from %s: %r", peer, e)
        finally:
            if not future.done():
                future.set_result(None)

    async def _download_from(self, peer, chunk_timeout: float, max_bytes: int):
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata, parts, tensors, received = None, [], [], 0
        async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
            received += len(message.metadata) + len(message.tensor_part.buffer)
            if received > max_bytes:
                raise OversizedMessage(f"it sent more than the state's size ({max_bytes} bytes)")
            if message.metadata:
                metadata = self.serializer.loads(message.metadata)
            if message.tensor_part.dtype and parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(message.tensor_part)
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        return (metadata, tensors) if metadata else None

    # --- members only (runs in the averager's process) ---------------------------------------------------
    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest,
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        """A private swarm serves its state only to libp2p ids that members declared in the (HMAC-checked) DHT."""
        if self.swarm_key is not None and context.remote_id not in await self._member_ids():
            _log.warning("refused a state download to %s: not a member of this private swarm", context.remote_id)
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _member_ids(self) -> set:
        key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        found = await self.dht.get(key, latest=True, return_future=True)
        value = found.value if found is not None else None
        out = set()
        for sub in value if isinstance(value, dict) else ():
            try:
                out.add(PeerID(sub))
            except Exception:
                pass
        return out

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest,
                             context: P2PContext) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """Refuse followers that cannot prove membership of a private swarm (before they are in a group)."""
        if self.swarm_key is not None and not is_member(self.swarm_key, _user_part(request.gather), context.remote_id.to_base58().encode()):
            _log.warning("refused %s in matchmaking: not a member of this private swarm", context.remote_id)
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    # --- bans (runs in the averager's process) -------------------------------------------------------
    def _banned_ids(self) -> set:
        return getattr(self, "_banned", set())

    async def _set_banned(self, ids: list[str], future) -> None:
        self._banned = {PeerID.from_base58(i) for i in ids}
        self._hook_matchmaking()
        future.set_result(True)

    def _hook_matchmaking(self) -> None:
        """Refuse banned followers and followers outside this round's plan; never follow a banned leader or one
        that assembled a group with outsiders this round; remember who led the group (to name it)."""
        mm = self._matchmaking
        if getattr(mm, "_swarm_hooked", False):
            return
        check, find = mm._check_reasons_to_reject, mm.group_key_manager.get_averagers
        lead, follow = mm.leader_assemble_group, mm.follower_assemble_group

        def check_reasons(request, context):
            if context.remote_id in self._banned_ids() or context.remote_id in self._outsiders():
                return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            why = self._why_outside(_user_part(request.gather), context.remote_id.to_base58())
            if why:
                if context.remote_id not in self._off_plan():
                    _log.warning("refused %s in matchmaking: %s", context.remote_id, why)
                self._off_plan().add(context.remote_id)
                return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            self._off_plan().discard(context.remote_id)  # it replanned: its request now names ours
            return check(request, context)

        async def get_averagers(*args, **kw):
            avoid = self._banned_ids() | self._outsiders() | self._off_plan()
            return [(p, t) for p, t in await find(*args, **kw) if p not in avoid]

        async def leader_assemble_group(*args, **kw):
            mm._swarm_leader = self.peer_id
            return await lead(*args, **kw)

        async def follower_assemble_group(leader, *args, **kw):
            mm._swarm_leader = leader
            return await follow(leader, *args, **kw)

        mm._check_reasons_to_reject, mm.group_key_manager.get_averagers = check_reasons, get_averagers
        mm.leader_assemble_group, mm.follower_assemble_group = leader_assemble_group, follower_assemble_group
        mm._swarm_hooked = True
