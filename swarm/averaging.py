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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def decode(averaged: np.ndarray, group_size: int, clip_norm: float, values: int | None = None,
           salt_sum: int | None = None) -> Averaged:
    """Recover the exact integer sum from an equal-weight average and check it is sound.

    `values` = how many gradient values were encoded (default: all but padding is assumed zero);
    `salt_sum` = the sum of the group's announced salts (None: check lanes are only checked to agree).
    """
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
    data = lanes[:, :CHECK_EVERY].reshape(-1)
    if values is not None:
        data = data[:values]
    mean = data / float(tokens) / 2.0 ** frac_bits(clip_norm)
    norm = float(np.sqrt(np.dot(mean, mean)))
    if norm > clip_norm * (1 + 1e-6):  # a mean of vectors of norm <= clip has norm <= clip
        raise AveragingError(f"averaged gradient norm {norm:.3g} exceeds the clip bound {clip_norm}: a contribution was out of bounds")
    return Averaged(mean_grad=mean, tokens=tokens)
