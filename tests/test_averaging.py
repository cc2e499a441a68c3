"""The exact fixed-point averaging: identical results whatever rounding each peer's all-reduce adds."""

import numpy as np
import pytest

from swarm.averaging import AveragingError, MAX_TOKENS_PER_PEER, clip_by_norm, decode, encode


def _delta_style(vectors):
    """What hivemind hands each peer: x_i + (avg - x_i), each step rounded."""
    avg = sum(vectors) / len(vectors)
    return [v + (avg - v) for v in vectors]


@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_every_peer_decodes_the_same_bits_and_the_true_weighted_mean(n):
    rng = np.random.default_rng(n)
    grads = [rng.normal(size=4096) * 10.0 ** rng.uniform(-6, -1) for _ in range(n)]
    tokens = [int(t) for t in rng.integers(1, 5000, size=n)]
    outs = [decode(v, n, 1.0) for v in _delta_style([encode(g, t, 1.0) for g, t in zip(grads, tokens)])]
    for o in outs[1:]:
        assert np.array_equal(o.mean_grad, outs[0].mean_grad)
    assert outs[0].tokens == sum(tokens)
    clipped = [clip_by_norm(g, 1.0)[0] for g in grads]
    ref = sum(g * t for g, t in zip(clipped, tokens)) / sum(tokens)
    assert np.max(np.abs(outs[0].mean_grad - ref)) < 2.0 ** -20  # quantum of the fixed point


def test_clipping_bounds_every_contribution():
    g = np.full(100, 10.0)
    out = decode(encode(g, 10, 1.0), 1, 1.0)
    assert abs(np.linalg.norm(out.mean_grad) - 1.0) < 1e-6


def test_a_lossy_all_reduce_is_detected():
    """hivemind's reducer sums in the default dtype; in float32 the exact integers are lost."""
    rng = np.random.default_rng(0)
    vs = [encode(rng.normal(size=1000) * 0.01, t, 1.0) for t in (3000, 2000, 1000)]
    avg32 = (sum(v.astype(np.float32) for v in vs) / np.float32(3)).astype(np.float64)
    with pytest.raises(AveragingError, match="not a sum of integer"):
        decode(avg32, 3, 1.0)


def test_out_of_bounds_contribution_is_rejected():
    honest = encode(np.ones(10) * 0.01, 100, 1.0)
    forged = honest.copy()
    forged[:-1] *= 1000  # a peer that skipped clipping (same token count)
    with pytest.raises(AveragingError, match="clip bound"):
        decode((honest + forged) / 2, 2, 1.0)


def test_a_chunk_that_was_not_averaged_is_detected():
    """hivemind keeps a dead reducer's chunk local (zero delta) and reports success: the check lanes catch it."""
    from swarm.averaging import CHECK_EVERY

    rng = np.random.default_rng(1)
    salts = [11, 222, 3333]
    vs = [encode(rng.normal(size=5000) * 1e-3, 1000, 1.0, salt) for salt in salts]
    outs = _delta_style(vs)
    ok = decode(outs[0], 3, 1.0, values=5000, salt_sum=sum(salts))
    assert ok.mean_grad.shape == (5000,)
    chunk = slice(2 * (CHECK_EVERY + 1), 4 * (CHECK_EVERY + 1) + 7)   # a reducer's span, kept local
    broken = outs[0].copy()
    broken[chunk] = vs[0][chunk]
    with pytest.raises(AveragingError, match="not averaged by the whole group"):
        decode(broken, 3, 1.0, values=5000, salt_sum=sum(salts))
    without = outs[0].copy()  # a chunk averaged without one member
    without[chunk] = ((vs[0] + vs[1]) / 2)[chunk]
    with pytest.raises(AveragingError):
        decode(without, 3, 1.0, values=5000, salt_sum=sum(salts))


def test_nan_and_token_bounds():
    with pytest.raises(AveragingError):
        decode(np.array([np.nan, 1.0]), 1, 1.0)
    with pytest.raises(AveragingError):
        encode(np.ones(3), MAX_TOKENS_PER_PEER + 1, 1.0)
    with pytest.raises(AveragingError):
        encode(np.array([np.inf, 0.0]), 10, 1.0)
    with pytest.raises(AveragingError, match="nothing to apply"):
        decode(encode(np.zeros(3), 0, 1.0), 1, 1.0)
