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


# --- untrusted senders: per-part checks, rejection markers, verdicts from the check lanes ----------------

from swarm.averaging import (  # noqa: E402
    CHECK_EVERY, Expect, add_checksums, attribute, check_part, checksum, data_values, marker_part, vector_size)


def _reduce(vectors, salts, tokens, bounds, me_keeps=None, absent=None):
    """A butterfly all-reduce in miniature: the vector cut into one chunk per member; each chunk's
    reducer checks every sender's part as swarm's reducers do (markers for rejected senders, nothing for
    `absent` = {chunk: sender}); returns the equal-weight average (what each member decodes)."""
    n, total = len(vectors), len(vectors[0])
    cuts = np.linspace(0, total, n + 1).astype(int)
    out = np.zeros(total)
    for r in range(n):
        a, b = cuts[r], cuts[r + 1]
        acc, d = np.zeros(b - a), 0
        for s in range(n):
            if absent and absent.get(r) == s:
                continue
            part = vectors[s][a:b]
            why, _ = check_part(part, a, total, Expect(tokens[s], salts[s], 1.0), 0.0) if len(part) == b - a else ("shape", 0)
            acc += marker_part(b - a, a, total, salts[s]) if why else part
            d += 1
        out[a:b] = acc / d
    return out


def _members(n, seed=0, values=3000):
    rng = np.random.default_rng(seed)
    salts = [int(s) for s in rng.integers(1, 1 << 40, size=n)]
    tokens = [int(t) for t in rng.integers(100, 4000, size=n)]
    vectors = [encode(rng.normal(size=values) * 1e-3, t, 1.0, s) for t, s in zip(tokens, salts)]
    return vectors, salts, tokens


def test_check_part_accepts_honest_parts_and_names_each_kind_of_garbage():
    vectors, salts, tokens = _members(1)
    v, total = vectors[0], len(vectors[0])
    e = Expect(tokens[0], salts[0], 1.0)
    assert check_part(v, 0, total, e, 0.0)[0] is None
    assert check_part(v[1000:2000], 1000, total, e, 0.0)[0] is None
    bad = v.copy()
    bad[5] = np.nan
    assert "NaN" in check_part(bad, 0, total, e, 0.0)[0]
    bad = v.copy()
    bad[5] += 0.5
    assert "fixed-point integers" in check_part(bad, 0, total, e, 0.0)[0]
    bad = v.copy()
    bad[CHECK_EVERY] += 1
    assert "salt" in check_part(bad, 0, total, e, 0.0)[0]
    bad = v.copy()
    bad[-1] += 1
    assert "tokens" in check_part(bad, 0, total, e, 0.0)[0]
    bad = v.copy()
    bad[:CHECK_EVERY] *= 1e4
    assert "clip bound" in check_part(bad, 0, total, e, 0.0)[0]
    assert "no valid" in check_part(v, 0, total, None, 0.0)[0]


def test_norm_bound_holds_across_parts_each_within_it():
    """Each part alone under the bound, the whole contribution above it: the running sum catches it."""
    vectors, salts, tokens = _members(1, values=CHECK_EVERY * 8)
    e = Expect(tokens[0], salts[0], 1.0)
    v = vectors[0].copy()
    lane = np.zeros(len(v), dtype=bool)
    lane[CHECK_EVERY::CHECK_EVERY + 1] = True
    lane[-1] = True
    v[~lane] = np.rint(0.9 * e.bound / np.sqrt(CHECK_EVERY * 8 / 2))  # two halves of norm 0.9 x bound: 1.27 x in all
    half = (len(v) - 1) // 2 // (CHECK_EVERY + 1) * (CHECK_EVERY + 1)
    why, sumsq = check_part(v[:half], 0, len(v), e, 0.0)
    assert why is None
    why, _ = check_part(v[half:], half, len(v), e, sumsq)
    assert why is not None and "clip bound" in why


@pytest.mark.parametrize("n", [2, 3, 5])
def test_clean_rounds_give_a_clean_verdict_and_exact_checksums(n):
    vectors, salts, tokens = _members(n, seed=n)
    avg = _reduce(vectors, salts, tokens, None)
    for me in range(n):
        assert attribute(avg, salts, me).clean
    values = 3000
    out = decode(avg, n, 1.0, values=values, salt_sum=sum(salts))
    assert out.checksum == add_checksums([checksum(data_values(v, values)) for v in vectors])


@pytest.mark.parametrize("n,bad", [(2, 0), (3, 2), (5, 1), (8, 7)])
def test_every_member_names_the_rejected_sender_from_the_lanes_alone(n, bad):
    vectors, salts, tokens = _members(n, seed=10 + n)
    vectors[bad] = vectors[bad].copy()
    vectors[bad][:-1:3] = np.nan  # garbage in every chunk
    avg = _reduce(vectors, salts, tokens, None)
    with pytest.raises(AveragingError):
        decode(avg, n, 1.0, salt_sum=sum(salts))
    for me in range(n):
        v = attribute(avg, salts, me)
        assert v.rejected == [bad] and v.absent == []


def test_rejected_in_one_chunk_only_is_still_named():
    n = 4
    vectors, salts, tokens = _members(n, seed=3)
    vectors[1] = vectors[1].copy()
    vectors[1][-5] = 1e18  # only the last chunk sees it (and it breaks the norm bound there)
    avg = _reduce(vectors, salts, tokens, None)
    assert attribute(avg, salts, 0).rejected == [1]


def test_a_sender_that_never_arrived_is_absent_not_rejected():
    n = 3
    vectors, salts, tokens = _members(n, seed=4)
    avg = _reduce(vectors, salts, tokens, None, absent={0: 2})
    v = attribute(avg, salts, 0)
    assert v.rejected == [] and v.absent == [2] and not v.clean


def test_lanes_nobody_can_explain_are_reported():
    vectors, salts, tokens = _members(3, seed=5)
    avg = _reduce(vectors, salts, tokens, None)
    avg[CHECK_EVERY] += 12345.0
    assert attribute(avg, salts, 0).unexplained == 1


def test_checksum_is_linear_mod_p():
    rng = np.random.default_rng(1)
    a, b = (rng.integers(-2 ** 49, 2 ** 49, size=1000).astype(np.float64) for _ in range(2))
    assert checksum(a + b) == add_checksums([checksum(a), checksum(b)])
    assert checksum(a) != checksum(a + np.eye(1, 1000, 7)[0])
    assert vector_size(3000) == len(encode(np.zeros(3000), 10, 1.0))


def test_expectations_refuse_out_of_line_norms_and_bad_announcements():
    from swarm.averaging import expectations

    g = lambda norm, tokens=100, salt=7: {"tokens": tokens, "salt": salt, "norm": norm}  # noqa: E731
    honest = [g(0.4), g(0.5), g(0.9)]
    assert all(e.refuse is None for e in expectations(honest, 1.0, 10.0))
    out = expectations([g(0.01), g(0.012), g(0.011), g(0.9)], 1.0, 10.0)
    assert [e.refuse is None for e in out] == [True, True, True, False]
    assert "x the group's median" in out[3].refuse
    assert expectations([g(0.01), g(0.9)], 1.0, 10.0)[1].refuse is None   # two members: no median to trust
    assert expectations([g(0.01), g(0.012), g(0.9)], 1.0, None)[2].refuse is None  # ratio off
    assert "announced gradient norm" in expectations([g(1.5)], 1.0, 10.0)[0].refuse
    assert "announced gradient norm" in expectations([g(float("nan"))], 1.0, 10.0)[0].refuse
    assert "announced gradient norm" in expectations([g(None)], 1.0, 10.0)[0].refuse
    assert expectations([g(0.5, tokens=-1)], 1.0, 10.0) == [None]
    assert expectations([g(0.5, salt=0)], 1.0, 10.0) == [None]
    assert expectations([{"tokens": True, "salt": 3, "norm": 0.5}], 1.0, 10.0) == [None]  # bool is not an int


def test_parts_larger_than_the_announced_norm_are_rejected():
    vectors, salts, tokens = _members(1)
    v = vectors[0]
    from swarm.averaging import Expect as E

    norm = float(np.linalg.norm(data_values(v, 3000))) / (tokens[0] * 2.0 ** 22)  # frac_bits(1.0) = 22
    assert check_part(v, 0, len(v), E(tokens[0], salts[0], 1.0, norm=norm * 1.01), 0.0)[0] is None
    why = check_part(v, 0, len(v), E(tokens[0], salts[0], 1.0, norm=norm / 10), 0.0)[0]
    assert why is not None and "norm it announced" in why
