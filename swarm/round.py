"""One round: train this peer's quota, average with the group, and say exactly what happened.

Nothing here changes the adapter: `average_round` returns the averaged gradient (or why there is
none) and the caller commits it with the optimizer or rolls back (= applies nothing).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from swarm.averaging import (MAX_TOKENS_PER_PEER, AveragingError, attribute, checksum, clip_by_norm, data_values, decode,
                             encode, flatten, new_salt, unflatten)
from swarm.backends.base import TrainResult
from swarm.codec import Int8Contribution, decode_int8
from swarm.transport.base import Transport, TransportError


RESULT_WAIT = 15.0  # seconds a member waits for the others' signed hashes of the result before committing


class Pacer:
    """Hands out micro-batches, idling so compute is at most `max_utilization` of wall time; stops at `deadline`.

    The time between two hand-outs is the backend's compute on the previous micro-batch; after it we
    sleep compute x (1 - F) / F. Past the deadline (or when `stop()` says so) no more batches are
    handed out: the peer contributes what it trained, and averaging weighs it by those tokens.
    """

    def __init__(self, batches: Iterable[np.ndarray], *, deadline: float, max_utilization: float = 1.0,
                 stop=lambda: False, clock=time.monotonic, sleep=time.sleep) -> None:
        self.batches, self.deadline, self.util = batches, deadline, max_utilization
        self.stop, self.clock, self.sleep = stop, clock, sleep
        self.slept = 0.0
        self.cut_short = False

    def __iter__(self) -> Iterator[np.ndarray]:
        handed_out = None
        for batch in self.batches:
            now = self.clock()
            if handed_out is not None and self.util < 1.0:
                pause = (now - handed_out) * (1.0 - self.util) / self.util
                self.sleep(pause)
                self.slept += pause
                now = self.clock()
            if now >= self.deadline or self.stop():
                self.cut_short = True
                return
            handed_out = now
            yield batch
        if handed_out is not None and self.util < 1.0 and not self.cut_short:
            # idle after the last micro-batch too, so the round as a whole computes at most F of the time
            now = self.clock()
            pause = min((now - handed_out) * (1.0 - self.util) / self.util, max(0.0, self.deadline - now))
            self.sleep(pause)
            self.slept += pause


@dataclass
class RoundOutcome:
    ok: bool
    reason: str = ""                          # why the round failed (ok=False)
    mean_grads: dict[str, np.ndarray] | None = None
    group_tokens: int = 0
    group_size: int = 0
    group_loss: float | None = None           # token-weighted mean loss of the group
    members: list[str] = field(default_factory=list)
    reduce_seconds: float = 0.0
    slowest_seconds: float = 0.0              # the longest local training time in the group (adapts the deadline)
    speeds: dict[str, float] = field(default_factory=dict)  # each member's measured full-speed tokens/s this round
    barrier_wait: float = 0.0                 # this peer's wait for the group's last member (swarm clock), no transfer
    offenders: dict[str, str] = field(default_factory=dict)  # members whose contribution was rejected: why
    absent: list[str] = field(default_factory=list)  # members whose contribution never reached the sum (died mid-way)
    contribution_checksum: int | None = None  # linear checksum of this peer's encoded contribution
    grad_norm: float | None = None            # this peer's clipped gradient norm (announced to the group)
    sum_checksum: int | None = None           # ... of the exact integer sum the group applied
    update_sha256: str = ""                   # hash of the averaged update (bit-identical on every member)
    gathered: dict[str, dict] = field(default_factory=dict)  # every member's announcement (the same on every member)
    bytes_sent: int = 0                       # this peer's averaging traffic in the round, framing included
    bytes_received: int = 0
    residual: np.ndarray | None = None        # int8 codec: this peer's error feedback after the round (keep it on commit)


def average_round(transport: Transport, train: TrainResult, *, names: list[str], shapes: dict[str, tuple[int, ...]],
                  round_: int, plan_id: str, group_size: int, clip_norm: float, timeout: float,
                  run: str, wait_until: float | None = None, speed: float = 0.0,
                  quotas: dict[str, int] | None = None, max_tokens: int = MAX_TOKENS_PER_PEER,
                  lineage: str, abandon=None, salt: int | None = None, extra: dict | None = None,
                  codec: str = "exact", residual: np.ndarray | None = None) -> RoundOutcome:
    """All-reduce this peer's clipped, token-weighted gradient with the group; validate everything.

    `quotas`: each peer's token quota in plan `plan_id` (a member of the same plan claiming more
    tokens is rejected); `max_tokens`: the most any member may claim (the round's whole budget);
    `abandon`: asked while no group has formed, a reason it gives ends this attempt early;
    `lineage`: the state this peer starts the round from (`TrainingState.lineage`): it is part of the
    group key and of the signed announcement, so only members starting from the same state average
    together; a member announcing another lineage fails the attempt before its part is used;
    `salt`: this peer's check-lane salt, the same in every attempt of a round (default: a new one). An
    attempt abandoned while a leader was already forming its group may still be averaged with the
    announcement of that attempt: with one salt per round, the parts of the next attempt match it,
    and an honest peer is never rejected for "check lanes that do not carry the salt it announced".
    `extra`: more fields for this peer's announcement (e.g. its held-out eval part, swarm.evaluation); every
    member gets every member's back in `outcome.gathered`.
    `codec`: `averaging.codec` (swarm.codec); with int8, `residual` is this peer's error feedback from its last
    committed round, and the new one is `outcome.residual`, for the caller to keep only if it commits."""
    values = sum(int(np.prod(shapes[n])) for n in names)
    salt = salt if salt is not None else new_salt()
    try:
        flat = flatten(train.grads, names) if train.tokens else np.zeros(values)
        norm = min(clip_by_norm(flat, clip_norm)[1], clip_norm)
        if codec == "int8":  # encoded once the group's shared scales are known (swarm.codec)
            int8 = Int8Contribution.make(flat, train.tokens, clip_norm, salt, residual)
            vector, announce = int8, int8.announce()
        else:
            int8, vector, announce = None, encode(flat, train.tokens, clip_norm, salt), {}
    except AveragingError as e:
        return RoundOutcome(ok=False, reason=f"not contributing: {e}")
    mine = checksum(data_values(vector, values)) if int8 is None else None
    gather = {**(extra or {}), "peer": transport.peer_id, "round": round_, "tokens": train.tokens, "loss_sum": float(train.loss_sum),
              "plan": plan_id, "salt": salt, "norm": float(norm), "seconds": float(train.seconds), "speed": float(speed),
              "arrived": float(transport.now()), "lineage": lineage, **announce}
    if group_size <= 1:
        if int8 is not None:
            vector = int8.encode(int8.exponents)
        result_vec, gathered, seconds, traffic = vector, {transport.peer_id: gather}, 0.0, {}
    else:
        try:
            res = transport.all_reduce(vector, group_key=f"{run}.r{round_}.{lineage[:16]}", group_size=group_size, gather=gather,
                                       timeout=timeout, wait_until=wait_until, abandon=abandon,
                                       allowed=set(quotas) if quotas is not None else None)
        except TransportError as e:
            return RoundOutcome(ok=False, reason=str(e), contribution_checksum=mine)
        result_vec, gathered, seconds = res.vector, res.gathered, res.seconds
        traffic = {"bytes_sent": res.bytes_sent, "bytes_received": res.bytes_received}
        if int8 is not None:
            vector = int8.vector  # what this peer sent, in the exact codec's layout
    if int8 is not None:
        mine = checksum(data_values(vector, values))
    members, tokens, loss, salts, slowest, speeds, arrivals = [], 0, 0.0, 0, 0.0, {}, []
    for peer, g in sorted(gathered.items()):
        if not isinstance(g, dict) or g.get("peer") != peer or g.get("round") != round_ \
                or type(g.get("tokens")) is not int or not 0 <= g["tokens"] <= 1 << 20 \
                or not isinstance(g.get("loss_sum"), float) or not math.isfinite(g["loss_sum"]) \
                or type(g.get("salt")) is not int or not 0 < g["salt"] < 1 << 40:
            why = f"it sent bad round metadata: {str(g)[:120]}"
            return RoundOutcome(ok=False, reason=f"peer {peer}: {why}", offenders={peer: why}, contribution_checksum=mine)
        if g.get("lineage") != lineage:  # not an offence: it starts from another state (a fork) and must sync first
            return RoundOutcome(ok=False, reason=f"peer {peer} starts this round from another state "
                                f"({str(g.get('lineage'))[:12]}, this peer {lineage[:12]})", contribution_checksum=mine)
        if quotas is not None and (peer not in quotas or g.get("plan") != plan_id):  # quotas only from this plan
            return RoundOutcome(ok=False, reason=f"peer {peer} is not in this round's plan (it names plan "
                                f"{str(g.get('plan'))[:16]})", contribution_checksum=mine)
        quota = quotas.get(peer) if quotas is not None else None
        if g["tokens"] > min(max_tokens, quota if quota is not None else max_tokens):
            why = (f"it claims {g['tokens']} tokens, its quota in this round's plan is {quota}" if quota is not None
                   else f"it claims {g['tokens']} tokens, more than the round's budget of {max_tokens}")
            return RoundOutcome(ok=False, reason=f"peer {peer}: {why}", offenders={peer: why}, contribution_checksum=mine)
        members.append(peer)
        tokens += g["tokens"]
        loss += g["loss_sum"]
        salts += g["salt"]
        if isinstance(g.get("seconds"), float) and math.isfinite(g["seconds"]):
            slowest = max(slowest, min(g["seconds"], 3600.0))
        if isinstance(g.get("arrived"), float) and math.isfinite(g["arrived"]):
            arrivals.append(g["arrived"])
        if isinstance(g.get("speed"), float) and math.isfinite(g["speed"]) and 0 < g["speed"] < 1e9:
            speeds[str(g.get("peer"))] = g["speed"]
    try:
        avg = decode(result_vec, len(gathered), clip_norm, values=values, salt_sum=salts) if int8 is None else \
            decode_int8(result_vec, len(gathered), int8.shared, clip_norm, values=values, salt_sum=salts)
    except AveragingError as e:
        return _explain(e, result_vec, members, gathered, transport.peer_id, res.rejections if group_size > 1 else {}, mine)
    if avg.tokens != tokens:
        return RoundOutcome(ok=False, reason=f"group says it trained {tokens} tokens but averaged {avg.tokens}",
                            contribution_checksum=mine)
    update = hashlib.sha256(np.ascontiguousarray(avg.mean_grad, dtype=np.float64).tobytes()).hexdigest()
    if group_size > 1:  # every member must have received this very result (a reducer could hand out different ones)
        from swarm.verify import agree_on_result, attempt_id

        why, offenders = agree_on_result(transport, key=f"{run}.r{round_}.{lineage[:16]}.result", members=members,
                                         digest=update, result=result_vec, contribution=vector, spans=res.spans,
                                         leader=res.leader,
                                         attempt=attempt_id(gathered),
                                         wait=min(RESULT_WAIT, max(timeout, 1.0)))
        if why:
            return RoundOutcome(ok=False, reason=why, offenders=offenders, contribution_checksum=mine)
    return RoundOutcome(ok=True, mean_grads=unflatten(avg.mean_grad, names, shapes), group_tokens=tokens, update_sha256=update,
                        group_size=len(gathered), group_loss=loss / tokens, members=members,
                        reduce_seconds=seconds, slowest_seconds=slowest, speeds=speeds,
                        barrier_wait=max(0.0, min(max(arrivals, default=0.0) - gather["arrived"], seconds)),
                        contribution_checksum=mine, sum_checksum=avg.checksum, grad_norm=norm, **traffic,
                        residual=int8.residual if int8 is not None else None,
                        gathered={p: g for p, g in gathered.items() if p in members})


def _explain(error: AveragingError, averaged: np.ndarray, members: list[str], gathered: dict, me: str,
             rejections: dict[str, str], mine: int) -> RoundOutcome:
    """The averaged vector is not a clean sum: read from its check lanes which members were rejected
    (named, with this peer's own reducer's reason where it has one) or missing."""
    verdict = attribute(averaged, [gathered[m]["salt"] for m in members], members.index(me) if me in members else -1)
    offenders = {members[i]: rejections.get(members[i], "another member's checks rejected its contribution")
                 for i in verdict.rejected}
    if offenders:
        named = "; ".join(f"peer {p}: {why}" for p, why in offenders.items())
        return RoundOutcome(ok=False, reason=f"contribution rejected ({named})", offenders=offenders, contribution_checksum=mine)
    if verdict.absent:
        absent = [members[i] for i in verdict.absent]
        return RoundOutcome(ok=False, reason=f"{error} (missing: {', '.join(absent)})", contribution_checksum=mine,
                            absent=absent)
    return RoundOutcome(ok=False, reason=str(error), contribution_checksum=mine)
