"""The averaging codec (`averaging.codec`): how a contribution travels, and how the group recovers its exact sum.

exact (the default): `swarm.averaging` as it always was: float64 fixed-point integers on the wire, 8 bytes a
value each way. int8: 1 byte a value to the reducers, 2 bytes a value back, and still every peer ends the
round with the same bits: the codec is lossy per peer but the *sum* is exact.

Why it stays bit-identical: a peer sends integers q in [-127, 127], the reducer sums integers exactly (in
float64, |sum| <= 127 x 256 < 2^15, sent back as int16) and every member multiplies the same integer sum by the
same power-of-two step and divides by the same token count. What differs per peer is only what it *failed* to
send (its quantization error), and that never leaves it: it keeps it as its **error-feedback residual** and adds
it to its next round's contribution, so the cumulative applied update tracks the cumulative true gradient (the
error does not accumulate; it is at most half a step per value, once).

Scales, shared: per block of CHECK_EVERY (256) values, step 2^E with E the same on every member. Each peer
announces, in its signed gather, its own smallest exponent e_b with 127 x 2^e_b >= max |x_b| (1 byte a block,
`exps`); once the group has formed every member takes E_b = max over the members of e_b (`shared_exponents`),
so no honest value ever saturates. The vector is therefore encoded only after the group forms: the tcp
transport takes an `Int8Contribution` (with `.size` and `.encode(shared)`) in place of a vector. Deriving scales
from the previous committed update instead (no announcement) would save those bytes but saturate on a gradient
spike; announcing costs 1/256 of a value per block and member.

Untrusted senders, as in the exact codec: check lanes (salt), token count last, per-sender validation at every
reducer and rejection markers (`swarm.averaging.marker_part`), so `attribute` names offenders the same way.
On top: every datum must be an integer in [-127, 127] (the wire makes it an integer; -128 is refused), the
announced exponents must be well formed and consistent with the announced norm (the block maxima they imply
are distinct values of the contribution, so sqrt(sum_b (127 x 2^(e_b - 1))^2) <= its norm: a peer cannot
coarsen everyone's steps beyond its own norm budget), and the contribution's norm, in real units, is bounded
by (1 + RESIDUAL_CAP) x norm x tokens plus half a step a value (honest peers cap their residual at
RESIDUAL_CAP x norm x tokens, dropping the excess, to stay within it).

Wire (tcp only, `Int8Wire`): a part [a, b) is its data values as int8, then its check lanes and token count
(if in range) as little-endian int64; the reducer's answer is its span's integer *sum* as int16 data + int64
lanes, which every member (the reducer too, from the same bytes) turns into the same float64 average sum / n,
so `decode`, `attribute` and `swarm.verify` read it exactly as an exact-codec average.

The residual lives in the peer's memory and is committed only when the round commits (a failed or retried
round re-sends the same contribution from the same residual). It is not in the checkpoint: a restarted
peer starts from zero, losing at most half a step a value of one round's contribution, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from swarm.averaging import (CHECK_EVERY, AveragingError, Averaged, Expect, _positions, check_part, checksum,
                             clip_by_norm, exact_sum, vector_size)

Codec = Literal["exact", "int8"]
CODECS: tuple[str, ...] = ("exact", "int8")

QMAX = 127            # |q| <= 127: -128 is never sent (a symmetric range, and |sum| <= 127 x 256 fits int16)
ZERO = -128           # announced exponent of an all-zero block
E_MIN, E_MAX = -120, 120  # step 2^E: far beyond any clipped gradient x tokens, and no float64 subnormals
RESIDUAL_CAP = 0.5    # an honest peer's residual norm is at most this x its announced norm x its tokens
_SLACK = 1 + 1e-6     # float64 rounding of norms


def transport_refusal(codec: str, transport: str) -> str | None:
    """Why `codec` cannot run over `transport` (one line naming the fix), or None."""
    if codec != "exact" and transport != "tcp":
        return (f"averaging.codec {codec} needs --transport tcp (hivemind's reducers send deltas, which do not "
                f"sum to the same bits on every peer)")
    return None


def blocks_of(values: int) -> int:
    return -(-values // CHECK_EVERY)


def own_exponents(x: np.ndarray) -> np.ndarray:
    """Per block of CHECK_EVERY values: the smallest e with 127 x 2^e >= max |x_b| (ZERO for an all-zero block), int8."""
    blocks = blocks_of(len(x))
    padded = np.zeros(blocks * CHECK_EVERY)
    padded[:len(x)] = np.abs(x)
    m = padded.reshape(blocks, CHECK_EVERY).max(axis=1) if blocks else np.zeros(0)
    if not np.all(np.isfinite(m)):
        raise AveragingError("local contribution is not finite")
    _, k = np.frexp(m)                      # m in [2^(k-1), 2^k)
    e = k.astype(np.int64) - 7              # 127 x 2^(k-7) < 2^k: one more where it falls short of m
    e = np.where(np.ldexp(float(QMAX), e.astype(np.int32)) >= m, e, e + 1)
    e = np.maximum(e, E_MIN)
    if np.any((e > E_MAX) & (m > 0)):
        raise AveragingError(f"a contribution value of {float(m.max()):.3g} is beyond the int8 codec's range")
    return np.where(m > 0, e, ZERO).astype(np.int8)


def steps(exponents: np.ndarray) -> np.ndarray:
    """Each block's step 2^E (0 for a ZERO block), float64."""
    e = np.asarray(exponents, dtype=np.int64)
    return np.where(e == ZERO, 0.0, np.ldexp(1.0, np.where(e == ZERO, 0, e).astype(np.int32)))


def implied_norm(exponents: np.ndarray) -> float:
    """A lower bound on the norm of a contribution whose own exponents these are: each block's maximum is
    above 127 x 2^(e - 1) (e is the smallest that fits), and the maxima are distinct values."""
    e = np.asarray(exponents, dtype=np.int64)
    lows = np.where((e == ZERO) | (e <= E_MIN), 0.0, np.ldexp(float(QMAX), np.clip(e - 1, E_MIN, E_MAX).astype(np.int32)))
    return float(np.sqrt(np.dot(lows, lows)))


def parse_exponents(raw: object, blocks: int) -> tuple[np.ndarray | None, str | None]:
    """A member's announced `exps` (untrusted): (int8 exponents, None) or (None, why not)."""
    if not isinstance(raw, bytes) or len(raw) != blocks:
        return None, f"it announced {len(raw) if isinstance(raw, bytes) else 'no'} int8 scales, expected {blocks}"
    e = np.frombuffer(raw, dtype=np.int8)
    if np.any((e != ZERO) & ((e < E_MIN) | (e > E_MAX))):
        return None, f"it announced scales outside 2^{E_MIN}..2^{E_MAX}"
    return e, None


@dataclass
class Int8Contribution:
    """One peer's int8 contribution of a round, encoded once the group (and so its shared scales) is known."""
    target: np.ndarray          # float64: clip(g) x tokens + the residual it owes (what it should add to the sum)
    tokens: int
    salt: int
    exponents: np.ndarray       # its own per-block exponents (announced as `exps`)
    carry: np.ndarray | None    # a residual kept unsent (a round without tokens sends nothing and owes it all)
    shared: np.ndarray | None = None    # the group's exponents (set by `encode`)
    vector: np.ndarray | None = None    # the encoded vector (exact float64 integers, the exact codec's layout)
    residual: np.ndarray | None = None  # what it still owes after this round: committed only with the round

    @classmethod
    def make(cls, mean_grad: np.ndarray, tokens: int, clip_norm: float, salt: int,
             residual: np.ndarray | None = None) -> "Int8Contribution":
        g, norm = clip_by_norm(np.asarray(mean_grad, dtype=np.float64), clip_norm)
        norm = min(norm, clip_norm)
        r = None if residual is None else np.asarray(residual, dtype=np.float64)
        if r is not None and (r.shape != g.shape or not np.all(np.isfinite(r))):
            r = None  # not this vector's (another adapter shape): start afresh
        if tokens <= 0:
            return cls(np.zeros_like(g), tokens, salt, own_exponents(np.zeros_like(g)), carry=r)
        x = g * float(tokens)
        if r is not None:
            cap = RESIDUAL_CAP * norm * tokens
            rn = float(np.sqrt(np.dot(r, r)))
            x = x + (r if rn <= cap else r * (cap / rn * (1 - 1e-9)))  # the excess is dropped, never sent
        return cls(x, tokens, salt, own_exponents(x), carry=None)

    @property
    def size(self) -> int:
        return vector_size(len(self.target))

    def announce(self) -> dict:
        """Fields for this peer's signed gather."""
        return {"exps": np.ascontiguousarray(self.exponents, dtype=np.int8).tobytes()}

    def encode(self, shared: np.ndarray) -> np.ndarray:
        """The vector (exact codec layout) of q = round(x / 2^E) with the group's exponents; sets `residual`."""
        shared = np.asarray(shared, dtype=np.int8)
        blocks = blocks_of(len(self.target))
        if len(shared) != blocks:
            raise AveragingError(f"{len(shared)} shared scales for {blocks} blocks")
        # the group's scales are at least this peer's own unless the group refused its announcement: then values
        # saturate at +-127 (a block scaled ZERO sends nothing) and the residual keeps the rest
        step = np.repeat(steps(shared), CHECK_EVERY)[:len(self.target)]
        safe = np.where(step > 0, step, 1.0)
        q = np.where(step > 0, np.clip(np.rint(self.target / safe), -QMAX, QMAX), 0.0)
        lanes = np.zeros((blocks, CHECK_EVERY + 1))
        padded = np.zeros(blocks * CHECK_EVERY)
        padded[:len(q)] = q
        lanes[:, :CHECK_EVERY] = padded.reshape(blocks, CHECK_EVERY)
        lanes[:, CHECK_EVERY] = float(self.salt)
        self.shared = shared
        self.vector = np.concatenate([lanes.reshape(-1), [float(self.tokens)]])
        self.residual = self.carry if self.tokens <= 0 else self.target - q * step
        return self.vector


def group_scales(gathers: list[dict], expects: list[Expect | None], blocks: int) -> tuple[list[Expect | None], np.ndarray]:
    """(each member's Expect, refused where its scales are malformed or exceed its norm; the shared exponents):
    the maximum per block over the members whose announcement is sound. Pure: the same on every member."""
    out, shared = list(expects), np.full(blocks, ZERO, dtype=np.int8)
    for i, (g, e) in enumerate(zip(gathers, expects)):
        if e is None or e.norm is None:
            continue  # no valid announcement: refused anyway, its scales count for nothing
        exps, why = parse_exponents(g.get("exps") if isinstance(g, dict) else None, blocks)
        if why is None and e.tokens > 0:
            low, budget = implied_norm(exps), (1 + RESIDUAL_CAP) * e.norm * e.tokens * _SLACK
            if low > budget:
                why = f"its announced scales imply a contribution norm of at least {low:.3g}, above its budget {budget:.3g}"
        elif why is None and np.any(exps != ZERO):
            why = "it announced scales for a contribution of 0 tokens"
        if why is not None:
            out[i] = Expect(e.tokens, e.salt, e.clip_norm, norm=e.norm, refuse=why)
            continue
        shared = np.maximum(shared, exps)
    return out, shared


def decode_int8(averaged: np.ndarray, group_size: int, shared: np.ndarray, clip_norm: float, values: int,
                salt_sum: int | None = None) -> Averaged:
    """The group's token-weighted mean gradient from an equal-weight average of int8 contributions."""
    data, tokens = exact_sum(averaged, group_size, salt_sum)
    step = np.repeat(steps(shared), CHECK_EVERY)
    if len(step) != len(data):
        raise AveragingError(f"{len(shared)} scales for {len(data) // CHECK_EVERY} blocks")
    data, step = data[:values], step[:values]
    mean = data * step / float(tokens)
    norm = float(np.sqrt(np.dot(mean, mean)))
    bound = (1 + RESIDUAL_CAP) * clip_norm * _SLACK + group_size * 0.5 * float(np.sqrt(np.dot(step, step))) / tokens
    if norm > bound:
        raise AveragingError(f"averaged gradient norm {norm:.3g} exceeds the int8 codec's bound {bound:.3g}: "
                             "a contribution was out of bounds")
    return Averaged(mean_grad=mean, tokens=tokens, checksum=checksum(data))


# --- wire formats of the tcp butterfly (swarm/transport/tcp/allreduce.py) --------------------------------

class ExactWire:
    """float64 parts out, float64 averages back: the exact codec's protocol, byte for byte."""

    def __init__(self, expects: list[Expect | None]) -> None:
        self.expects = expects
        self.sumsq = [0.0] * len(expects)

    def pack_part(self, values: np.ndarray, start: int, total: int) -> bytes:
        return values.astype("<f8", copy=False).tobytes()

    def open_part(self, raw: bytes, start: int, end: int, total: int) -> tuple[np.ndarray | None, str | None]:
        n = end - start
        if len(raw) != n * 8:
            return None, f"it sent a part of {len(raw)} bytes, expected float64 x {n} ({n * 8} bytes)"
        return np.frombuffer(raw, dtype="<f8"), None

    def check(self, sender: int, part: np.ndarray, start: int, total: int) -> str | None:
        why, self.sumsq[sender] = check_part(part, start, total, self.expects[sender], self.sumsq[sender])
        return why

    def pack_result(self, acc: np.ndarray, start: int, total: int, n: int) -> bytes:
        return (acc / float(n)).astype("<f8", copy=False).tobytes()

    def result_bytes(self, start: int, end: int, total: int) -> int:
        return (end - start) * 8

    def open_result(self, raw: bytes, start: int, end: int, total: int, n: int) -> np.ndarray | None:
        return np.frombuffer(raw, dtype="<f8") if len(raw) == self.result_bytes(start, end, total) else None


@dataclass(frozen=True)
class _Unbounded(Expect):
    """`check_part`'s checks but its norm bound (the int8 wire weighs each block by its step)."""

    @property
    def bound(self) -> float:
        return math.inf


class Int8Wire(ExactWire):
    """int8 data + int64 lanes out; int16 data sums + int64 lane sums back (see the module docstring)."""

    def __init__(self, expects: list[Expect | None], shared: np.ndarray) -> None:
        super().__init__(expects)
        self.step = steps(shared)
        self.slack = 0.5 * float(np.sqrt(np.dot(self.step, self.step) * CHECK_EVERY))  # half a step a value
        self.loose = [None if e is None else _Unbounded(e.tokens, e.salt, e.clip_norm, e.norm, e.refuse) for e in expects]

    @staticmethod
    def _masks(start: int, end: int, total: int) -> tuple[np.ndarray, np.ndarray]:
        lane, token = _positions(start, end - start, total)
        side = lane | token
        return ~side, side

    def pack_part(self, values: np.ndarray, start: int, total: int) -> bytes:
        data, side = self._masks(start, start + len(values), total)
        return values[data].astype(np.int8).tobytes() + values[side].astype("<i8").tobytes()

    def _sizes(self, start: int, end: int, total: int, data_width: int) -> tuple[np.ndarray, np.ndarray, int]:
        data, side = self._masks(start, end, total)
        return data, side, int(data.sum()) * data_width + int(side.sum()) * 8

    def open_part(self, raw: bytes, start: int, end: int, total: int) -> tuple[np.ndarray | None, str | None]:
        data, side, size = self._sizes(start, end, total, 1)
        if len(raw) != size:
            return None, (f"it sent a part of {len(raw)} bytes, expected int8 x {int(data.sum())} + int64 x "
                          f"{int(side.sum())} ({size} bytes)")
        nd = int(data.sum())
        out = np.empty(end - start)
        out[data] = np.frombuffer(raw, dtype=np.int8, count=nd)
        out[side] = np.frombuffer(raw, dtype="<i8", offset=nd)
        return out, None

    def check(self, sender: int, part: np.ndarray, start: int, total: int) -> str | None:
        why, _ = check_part(part, start, total, self.loose[sender], 0.0)
        if why is not None:
            return why
        data, _ = self._masks(start, start + len(part), total)
        q = part[data]
        if np.any(np.abs(q) > QMAX):
            return f"its values are outside the int8 codec's -{QMAX}..{QMAX}"
        idx = np.arange(start, start + len(part))[data]
        real = q * self.step[idx // (CHECK_EVERY + 1)]
        self.sumsq[sender] += float(np.dot(real, real))
        e = self.expects[sender]
        bound = (1 + RESIDUAL_CAP) * e.norm * e.tokens * _SLACK + self.slack
        norm = math.sqrt(self.sumsq[sender])
        if norm > bound:
            return f"its contribution norm is at least {norm / bound:.3g} x the bound its announced norm and tokens allow"
        return None

    def pack_result(self, acc: np.ndarray, start: int, total: int, n: int) -> bytes:
        data, side = self._masks(start, start + len(acc), total)
        sums = acc[data]
        if np.any(np.abs(sums) > 32767):  # not reached: |q| <= 127 per vetted sender, 256 senders at most
            raise AveragingError("an int8 sum does not fit int16")
        return sums.astype("<i2").tobytes() + acc[side].astype("<i8").tobytes()

    def result_bytes(self, start: int, end: int, total: int) -> int:
        return self._sizes(start, end, total, 2)[2]

    def open_result(self, raw: bytes, start: int, end: int, total: int, n: int) -> np.ndarray | None:
        data, side, size = self._sizes(start, end, total, 2)
        if len(raw) != size:
            return None
        nd = int(data.sum())
        out = np.empty(end - start)
        out[data] = np.frombuffer(raw, dtype="<i2", count=nd)
        out[side] = np.frombuffer(raw, dtype="<i8", offset=nd * 2)
        return out / float(n)  # the same float64 average on every member, from the same bytes


def open_group(codec: str, vector, gathers: list, expects: list[Expect | None]) -> tuple[np.ndarray, ExactWire]:
    """(the vector this member sends, the wire its exchange speaks) once the group is fixed: the exact codec's
    vector as given; an int8 contribution encoded with the group's shared scales (`group_scales`)."""
    if codec == "exact":
        if not isinstance(vector, np.ndarray):
            raise AveragingError("the exact codec averages a vector, not an int8 contribution")
        return vector, ExactWire(expects)
    if not isinstance(vector, Int8Contribution):
        raise AveragingError(f"averaging.codec {codec} needs an int8 contribution, not a plain vector")
    refused, shared = group_scales([g if isinstance(g, dict) else {} for g in gathers], expects,
                                   blocks_of(len(vector.target)))
    return vector.encode(shared), Int8Wire(refused, shared)
