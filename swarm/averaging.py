"""Exact, token-weighted gradient averaging on top of an all-reduce that only agrees up to rounding.

hivemind's all-reduce returns `x_i + (avg - x_i)` on each peer: equal only up to float rounding
(hivemind notes, trap 8). To end every round with bit-identical adapters on every peer, whatever
its framework, each peer sends its token-summed, clipped gradient in **fixed point**: integers
held exactly in float64. The all-reduce of integers with equal weights gives S/n (+ rounding);
every peer multiplies by the group size n and rounds back to the exact integer sum S, which is
the same on every peer. The token-weighted mean gradient is then S / (2^F * total tokens),
computed with the same float64 operations everywhere.

Precision: the mean gradient is quantized to 2^-F / tokens (F = 20: ~1e-9 for 1000 tokens),
far below fp32 training noise. Bounds keep every partial sum under 2^50 < 2^53.
Check lanes: hivemind averages the vector in contiguous chunks, and when a chunk's reducer dies
it silently keeps the local values for that chunk (zero delta) and still reports success. So every
CHECK_EVERY values a "check lane" carries this peer's random salt (announced in the all-reduce's
gather); after averaging, every lane must decode to exactly the sum of the group's salts. A
chunk that was not averaged, or averaged without a member, fails that test and the round is
rolled back. Values not within 0.25 of an integer (a lossy reduction) fail too.

Untrusted senders: every reducer checks each part it receives against what its sender announced
(`check_part`: finite, integers, its salt in the check lanes, its token count, the clip bound).
A sender that fails is not dropped silently: from that part on the reducer sums a **rejection
marker** in its place (zeros, and minus its salt in the check lanes). Every member then reads the
group's verdict from the lanes (`attribute`): a lane is sum(c_i * salt_i) / d with c_i = +1
(included), -1 (rejected for cause) or 0 (did not deliver), so each member names the same offenders
from the same averaged vector and retries the round without them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

MAX_TOKENS_PER_PEER = 1 << 20
MAX_GROUP_SIZE = 256
_BUDGET_BITS = 50  # |partial sums| < 2^50: exact in float64 with room for the mean's rounding error
CHECK_EVERY = 256  # one check lane per this many values: every averaged chunk holds several
SALT_BITS = 40     # salts in [1, 2^40): a group's sum stays below 2^48


class AveragingError(Exception):
    """The averaged vector is not a sound sum of contributions: roll the round back."""


def frac_bits(clip_norm: float) -> int:
    """Fixed-point fraction bits so that MAX_GROUP_SIZE peers x MAX_TOKENS x clip stay below 2^50."""
    headroom = _BUDGET_BITS - int(math.log2(MAX_GROUP_SIZE)) - int(math.log2(MAX_TOKENS_PER_PEER))
    return headroom - max(0, math.ceil(math.log2(clip_norm)))


def flatten(tensors: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[n], dtype=np.float64).ravel() for n in names])


def unflatten(flat: np.ndarray, names: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for n in names:
        size = int(np.prod(shapes[n]))
        out[n] = flat[at:at + size].reshape(shapes[n]).astype(np.float32)
        at += size
    return out


def clip_by_norm(flat: np.ndarray, max_norm: float) -> tuple[np.ndarray, float]:
    """Scale to L2 norm <= max_norm (the same float64 arithmetic on every backend); returns (clipped, norm before)."""
    norm = float(np.sqrt(np.dot(flat, flat)))
    if not math.isfinite(norm):
        raise AveragingError("local gradient is not finite")
    if norm > max_norm:
        flat = flat * (max_norm / norm)
    return flat, norm


def vector_size(values: int) -> int:
    """Length of the all-reduced vector for `values` gradient values (+ check lanes + the token count)."""
    return -(-values // CHECK_EVERY) * (CHECK_EVERY + 1) + 1


def new_salt(rng: np.random.Generator | None = None) -> int:
    return int((rng or np.random.default_rng()).integers(1, 1 << SALT_BITS))


def encode(mean_grad: np.ndarray, tokens: int, clip_norm: float, salt: int = 1) -> np.ndarray:
    """This peer's contribution as exact float64 integers: blocks of CHECK_EVERY values of
    round(clip(g) * tokens * 2^F), each followed by the salt, then the token count."""
    if not 0 <= tokens <= MAX_TOKENS_PER_PEER:
        raise AveragingError(f"{tokens} tokens in one round is outside 0..{MAX_TOKENS_PER_PEER}")
    if not 0 < salt < 1 << SALT_BITS:
        raise AveragingError("salt out of range")
    g, _ = clip_by_norm(np.asarray(mean_grad, dtype=np.float64), clip_norm)
    q = np.rint(g * (tokens * 2.0 ** frac_bits(clip_norm)))
    blocks = -(-len(q) // CHECK_EVERY)
    lanes = np.zeros((blocks, CHECK_EVERY + 1))
    padded = np.zeros(blocks * CHECK_EVERY)
    padded[:len(q)] = q
    lanes[:, :CHECK_EVERY] = padded.reshape(blocks, CHECK_EVERY)
    lanes[:, CHECK_EVERY] = float(salt)
    return np.concatenate([lanes.reshape(-1), [float(tokens)]])


@dataclass
class Averaged:
    mean_grad: np.ndarray  # float64, token-weighted mean of the group's clipped gradients
    tokens: int            # total tokens trained by the group
    checksum: int = 0      # linear checksum of the exact integer sum (see `checksum`)


def data_values(vector: np.ndarray, values: int) -> np.ndarray:
    """The gradient values of an encoded vector (no check lanes, no token count, no padding)."""
    return np.asarray(vector[:-1]).reshape(-1, CHECK_EVERY + 1)[:, :CHECK_EVERY].reshape(-1)[:values]


def exact_sum(averaged: np.ndarray, group_size: int, salt_sum: int | None = None) -> tuple[np.ndarray, int]:
    """The exact integer sum behind an equal-weight average, checked (whatever the codec): (its data integers,
    padding included, float64; the group's token count). AveragingError if it is not a sound, whole sum."""
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise AveragingError(f"group size {group_size} outside 1..{MAX_GROUP_SIZE}")
    s = np.asarray(averaged, dtype=np.float64) * group_size
    if not np.all(np.isfinite(s)):
        raise AveragingError("averaged vector has NaN or inf")
    exact = np.rint(s)
    off = float(np.max(np.abs(s - exact))) if len(s) else 0.0
    if off > 0.25:
        raise AveragingError(f"averaged vector is not a sum of integer contributions (off by {off:.3g}): partial all-reduce")
    if (len(exact) - 1) % (CHECK_EVERY + 1):
        raise AveragingError(f"averaged vector has length {len(exact)}, not a whole number of check blocks")
    lanes = exact[:-1].reshape(-1, CHECK_EVERY + 1)
    checks = lanes[:, CHECK_EVERY]
    expected = float(salt_sum) if salt_sum is not None else (checks[0] if len(checks) else 0.0)
    if len(checks) and not np.all(checks == expected):
        bad = int(np.count_nonzero(checks != expected))
        raise AveragingError(f"{bad} of {len(checks)} chunks were not averaged by the whole group (a member failed mid-all-reduce)")
    tokens = int(exact[-1])
    if not 0 < tokens <= group_size * MAX_TOKENS_PER_PEER:
        raise AveragingError(f"group trained {tokens} tokens: nothing to apply")
    return lanes[:, :CHECK_EVERY].reshape(-1), tokens


def decode(averaged: np.ndarray, group_size: int, clip_norm: float, values: int | None = None,
           salt_sum: int | None = None) -> Averaged:
    """Recover the exact integer sum from an equal-weight average and check it is sound.

    `values` = how many gradient values were encoded (default: all but padding is assumed zero);
    `salt_sum` = the sum of the group's announced salts (None: check lanes are only checked to agree).
    """
    data, tokens = exact_sum(averaged, group_size, salt_sum)
    if values is not None:
        data = data[:values]
    mean = data / float(tokens) / 2.0 ** frac_bits(clip_norm)
    norm = float(np.sqrt(np.dot(mean, mean)))
    if norm > clip_norm * (1 + 1e-6):  # a mean of vectors of norm <= clip has norm <= clip
        raise AveragingError(f"averaged gradient norm {norm:.3g} exceeds the clip bound {clip_norm}: a contribution was out of bounds")
    return Averaged(mean_grad=mean, tokens=tokens, checksum=checksum(data))


# --- untrusted senders ------------------------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    """What a sender announced in the gather: every part it sends must agree with it."""
    tokens: int
    salt: int
    clip_norm: float
    norm: float | None = None   # its announced (clipped) gradient norm; None: only the clip bound
    refuse: str | None = None   # rejected whatever it sends (its announcement alone is out of line)

    @property
    def bound(self) -> float:
        """Largest L2 norm of an honest encoded contribution: norm x tokens x 2^F, plus rounding."""
        norm = self.clip_norm if self.norm is None else min(self.norm, self.clip_norm)
        return norm * (1 + 1e-6) * self.tokens * 2.0 ** frac_bits(self.clip_norm) + 0.5 * math.sqrt(MAX_VALUES) + 1.0


def expectations(announced: list[dict], clip_norm: float, max_norm_ratio: float | None) -> list[Expect | None]:
    """Each group member's Expect from its announcement, the same on every reducer (same gather).

    None: no valid token count or salt. A member announcing a norm above the clip, or above
    `max_norm_ratio` x the median of the group's announced norms (groups of 3+), is refused."""
    out: list[Expect | None] = []
    for g in announced:
        tokens, salt, norm = g.get("tokens"), g.get("salt"), g.get("norm")
        if type(tokens) is not int or type(salt) is not int or not 0 <= tokens <= MAX_TOKENS_PER_PEER \
                or not 0 < salt < 1 << SALT_BITS:
            out.append(None)
        elif not isinstance(norm, float) or not 0.0 <= norm <= clip_norm * (1 + 1e-6):
            out.append(Expect(tokens, salt, clip_norm, refuse=f"it announced gradient norm {norm!r} (clip bound {clip_norm:g})"))
        else:
            out.append(Expect(tokens, salt, clip_norm, norm=norm))
    norms = [e.norm for e in out if e is not None and e.refuse is None and e.tokens > 0]
    if max_norm_ratio is not None and len(norms) >= 3:
        median = float(np.median(norms))
        for i, e in enumerate(out):
            if e is not None and e.refuse is None and e.tokens > 0 and e.norm > max_norm_ratio * median:
                out[i] = Expect(e.tokens, e.salt, clip_norm, norm=e.norm, refuse=(
                    f"its gradient norm {e.norm:.3g} is {e.norm / median:.3g} x the group's median {median:.3g} "
                    f"(limit {max_norm_ratio:g} x)"))
    return out


MAX_VALUES = 1 << 32  # rounding slack in `Expect.bound` (0.5 per value) for any vector we can hold


def _positions(start: int, length: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks, within the part [start, start+length) of a vector of `total`: check lanes, token count."""
    idx = np.arange(start, start + length)
    token = idx == total - 1
    lane = ((idx % (CHECK_EVERY + 1)) == CHECK_EVERY) & ~token
    return lane, token


def check_part(part: np.ndarray, start: int, total: int, expect: Expect | None, sumsq: float) -> tuple[str | None, float]:
    """Why this sender's part [start, start+len) is not an honest encoding, or None; and the running
    sum of squares of its data values (the norm bound holds for the whole contribution)."""
    if expect is None:
        return "announced no valid token count and salt", sumsq
    if expect.refuse is not None:
        return expect.refuse, sumsq
    if not np.all(np.isfinite(part)):
        return "its gradient contains NaN or inf", sumsq
    if not np.all(part == np.rint(part)):
        return "its values are not the swarm's fixed-point integers", sumsq
    lane, token = _positions(start, len(part), total)
    if np.any(part[lane] != float(expect.salt)):
        return "its check lanes do not carry the salt it announced", sumsq
    if np.any(part[token] != float(expect.tokens)):
        return f"its vector says {int(part[token][0])} tokens, it announced {expect.tokens}", sumsq
    data = part[~(lane | token)]
    sumsq += float(np.dot(data, data))
    norm = math.sqrt(sumsq)
    if norm > expect.bound:
        what = "the clip bound" if expect.norm is None else "the norm it announced (or the clip bound)"
        return f"its gradient norm is at least {norm / expect.bound:.3g} x {what}", sumsq
    return None, sumsq


def marker_part(length: int, start: int, total: int, salt: int) -> np.ndarray:
    """What a reducer sums instead of a rejected sender's part: zeros, minus its salt in the check lanes."""
    out = np.zeros(length)
    lane, _ = _positions(start, length, total)
    out[lane] = -float(salt)
    return out


@dataclass
class Verdict:
    rejected: list[int] = field(default_factory=list)  # members some reducer rejected for cause (c = -1)
    absent: list[int] = field(default_factory=list)    # members some reducer did not get (c = 0): died or too slow
    failed_chunks: int = 0                             # chunks nobody reduced (this peer kept its own values)
    unexplained: int = 0                               # lanes no combination explains

    @property
    def clean(self) -> bool:
        return not (self.rejected or self.absent or self.failed_chunks or self.unexplained)


def _candidates(n: int, me: int):
    """Coefficient vectors to try, most likely first: everyone, one member off, two off, only me."""
    yield (1,) * n
    for j in range(n):
        for c in (-1, 0):
            yield tuple(c if i == j else 1 for i in range(n))
    if n <= 16:
        for j in range(n):
            for k in range(j + 1, n):
                for cj in (-1, 0):
                    for ck in (-1, 0):
                        yield tuple(cj if i == j else ck if i == k else 1 for i in range(n))
    yield tuple(1 if i == me else 0 for i in range(n))


def attribute(averaged: np.ndarray, salts: list[int], me: int) -> Verdict:
    """Read, from the check lanes of an equal-weight average, which members each chunk included (+1),
    rejected (-1) or missed (0). `salts` in member order, `me` = this peer's index."""
    n = len(salts)
    v = np.asarray(averaged, dtype=np.float64)
    verdict = Verdict()
    if n == 0 or (len(v) - 1) % (CHECK_EVERY + 1):
        verdict.unexplained = 1
        return verdict
    lanes = v[:-1].reshape(-1, CHECK_EVERY + 1)[:, CHECK_EVERY]
    rejected, absent = set(), set()
    for value in np.unique(lanes):
        for c in _candidates(n, me):
            d = sum(1 for x in c if x)
            if d and math.isfinite(value) and abs(value * d - sum(x * s for x, s in zip(c, salts))) < 0.25:
                if c == (1,) * n:
                    pass
                elif n > 1 and c == tuple(1 if i == me else 0 for i in range(n)):
                    verdict.failed_chunks += 1
                else:
                    rejected.update(i for i, x in enumerate(c) if x == -1)
                    absent.update(i for i, x in enumerate(c) if x == 0)
                break
        else:
            verdict.unexplained += 1
    verdict.rejected, verdict.absent = sorted(rejected), sorted(absent - rejected)
    return verdict


_CHECKSUM_P = (1 << 31) - 1


@functools.lru_cache(maxsize=4)
def _checksum_weights(n: int) -> np.ndarray:
    return np.random.default_rng(20261122).integers(1, _CHECKSUM_P, size=n, dtype=np.int64)


def checksum(integers: np.ndarray) -> int:
    """A linear checksum of an integer vector: checksum(a + b) = checksum(a) + checksum(b) mod 2^31-1.

    Metrics record it for this peer's contribution and for the group's sum, so anyone can verify
    from metrics alone that a round applied exactly the sum of the contributions of its members."""
    q = np.mod(np.nan_to_num(np.asarray(integers, dtype=np.float64)), _CHECKSUM_P).astype(np.int64)
    return int(np.sum((q * _checksum_weights(len(q))) % _CHECKSUM_P) % _CHECKSUM_P)


def add_checksums(values: list[int]) -> int:
    return sum(values) % _CHECKSUM_P
