"""The int8 averaging codec (swarm/codec.py), pure: shared scales, exact sums, error feedback, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from swarm.averaging import CHECK_EVERY, AveragingError, attribute, expectations, marker_part, new_salt
from swarm.codec import (QMAX, RESIDUAL_CAP, ZERO, ExactWire, Int8Contribution, Int8Wire, blocks_of, decode_int8,
                         group_scales, open_group, own_exponents, steps, transport_refusal)

CLIP = 1.0
VALUES = 1000


def member(rng, values=VALUES, scale=0.01, tokens=None, residual=None):
    grad = rng.normal(size=values) * scale
    tokens = int(rng.integers(10, 100)) if tokens is None else tokens
    c = Int8Contribution.make(grad, tokens, CLIP, new_salt(rng), residual)
    gather = {"tokens": tokens, "salt": c.salt, "norm": float(min(np.linalg.norm(grad), CLIP)), **c.announce()}
    return c, gather


def reduce(contribs, gathers, max_norm_ratio=None):
    """What the tcp butterfly does, in one process: encode with the group's scales, vet, sum, answer."""
    expects = expectations(gathers, CLIP, max_norm_ratio)
    vectors, wires = zip(*(open_group("int8", c, gathers, expects) for c in contribs))
    wire, total = wires[0], len(vectors[0])
    acc, rejected = np.zeros(total), {}
    for i, v in enumerate(vectors):
        part, why = wire.open_part(wire.pack_part(v, 0, total), 0, total, total)
        why = why or wire.check(i, part, 0, total)
        if why:
            rejected[i] = why
            part = marker_part(total, 0, total, gathers[i]["salt"])
        acc += part
    raw = wire.pack_result(acc, 0, total, len(contribs))
    return wire.open_result(raw, 0, total, total, len(contribs)), wire, rejected, raw


def test_exponents_are_the_smallest_that_fit():
    x = np.zeros(3 * CHECK_EVERY)
    x[0], x[CHECK_EVERY] = 127 * 2.0 ** -10, 127 * 2.0 ** -10 * (1 + 1e-12)
    e = own_exponents(x)
    assert list(e) == [-10, -9, ZERO]
    for b, m in ((0, x[0]), (1, x[CHECK_EVERY])):
        assert QMAX * 2.0 ** int(e[b]) >= m > QMAX * 2.0 ** (int(e[b]) - 1)
    assert list(steps(e)) == [2.0 ** -10, 2.0 ** -9, 0.0]


def test_sums_are_exact_and_the_same_whatever_the_member_order():
    rng = np.random.default_rng(1)
    members = [member(rng, scale=0.01 * (k + 1)) for k in range(4)]
    avg, _, rejected, raw = reduce(*zip(*members))
    assert not rejected
    order = [2, 0, 3, 1]
    fresh = [(Int8Contribution.make(c.target / c.tokens, c.tokens, CLIP, c.salt), g) for c, g in members]
    avg2, _, _, raw2 = reduce(*zip(*[fresh[k] for k in order]))
    assert raw == raw2  # the reducer's int16/int64 sums: the same bytes
    salts = sum(g["salt"] for _, g in members)
    a = decode_int8(avg, 4, members[0][0].shared, CLIP, VALUES, salts)
    b = decode_int8(avg2, 4, fresh[0][0].shared, CLIP, VALUES, salts)
    assert a.mean_grad.tobytes() == b.mean_grad.tobytes() and a.tokens == b.tokens == sum(c.tokens for c, _ in members)
    # the exact sum of what each member sent, and close to the true token-weighted mean
    sent = sum(c.vector for c, _ in members)
    np.testing.assert_array_equal(np.rint(avg * 4), sent)
    true = sum(c.target for c, _ in members) / a.tokens
    step = np.repeat(steps(members[0][0].shared), CHECK_EVERY)[:VALUES]
    assert np.all(np.abs(a.mean_grad - true) <= 4 * 0.5 * step / a.tokens + 1e-15)
    # every member's residual is at most half the group's step a value: no honest value saturates
    for c, _ in members:
        assert np.all(np.abs(c.residual) <= 0.5 * step * (1 + 1e-12))


def test_error_feedback_tracks_the_cumulative_gradient():
    rng = np.random.default_rng(2)
    tokens, rounds = 50, 40
    residual, applied, true = None, np.zeros(VALUES), np.zeros(VALUES)
    big = member(rng, scale=0.05, tokens=tokens)  # a louder peer sets coarse shared scales every round
    for _ in range(rounds):
        grad = rng.normal(size=VALUES) * 0.001 + 0.0005  # a small, biased gradient: without feedback it rounds away
        c = Int8Contribution.make(grad, tokens, CLIP, 7, residual)
        shared = np.maximum(c.exponents, big[0].exponents)
        v = c.encode(shared)
        q = v[:-1].reshape(-1, CHECK_EVERY + 1)[:, :CHECK_EVERY].reshape(-1)[:VALUES]
        applied += q * np.repeat(steps(shared), CHECK_EVERY)[:VALUES]
        true += grad * tokens
        residual = c.residual
    np.testing.assert_allclose(applied + residual, true, rtol=0, atol=1e-12)  # nothing lost, only delayed
    step = np.repeat(steps(shared), CHECK_EVERY)[:VALUES]
    assert np.all(np.abs(residual) <= 0.5 * step + 1e-12)
    assert np.abs(applied - true).max() < 0.01 * np.abs(true).max() * 5
    no_feedback = Int8Contribution.make(grad, tokens, CLIP, 7)
    no_feedback.encode(shared)
    assert np.count_nonzero(no_feedback.vector[:-1]) < np.count_nonzero(v[:-1])  # it rounds much more to zero


def test_residual_is_capped_and_a_round_without_tokens_keeps_it():
    rng = np.random.default_rng(3)
    grad = rng.normal(size=VALUES) * 0.01
    huge = np.ones(VALUES)
    c = Int8Contribution.make(grad, 10, CLIP, 5, huge)
    assert np.linalg.norm(c.target - grad * 10) <= RESIDUAL_CAP * np.linalg.norm(grad) * 10 * (1 + 1e-6)
    idle = Int8Contribution.make(np.zeros(VALUES), 0, CLIP, 5, huge)
    v = idle.encode(idle.exponents)
    assert not np.any(v[:-1].reshape(-1, CHECK_EVERY + 1)[:, :CHECK_EVERY]) and idle.residual is huge
    assert Int8Contribution.make(grad, 10, CLIP, 5, np.ones(3)).target.tolist() == (grad * 10).tolist()  # wrong shape: dropped


def test_saturating_or_oversized_parts_are_rejected_and_attributed():
    rng = np.random.default_rng(4)
    members = [member(rng) for _ in range(3)]
    contribs, gathers = map(list, zip(*members))
    real_encode = contribs[1].encode

    def cheat(shared):  # every value at the int8 limit: far beyond its announced norm
        v = real_encode(shared).copy()
        data = np.ones(len(v), dtype=bool)
        data[CHECK_EVERY::CHECK_EVERY + 1] = False
        data[-1] = False
        v[data] = QMAX
        return v

    contribs[1].encode = cheat
    avg, _, rejected, _ = reduce(contribs, gathers)
    assert list(rejected) == [1] and "bound" in rejected[1]
    verdict = attribute(avg, [g["salt"] for g in gathers], 0)
    assert verdict.rejected == [1]
    with pytest.raises(AveragingError):
        decode_int8(avg, 3, contribs[0].shared, CLIP, VALUES, sum(g["salt"] for g in gathers))


def test_bad_wire_bytes_are_rejected_with_a_reason():
    rng = np.random.default_rng(5)
    (c, g), = [member(rng)]
    expects = expectations([g], CLIP, None)
    vec, wire = open_group("int8", c, [g], expects)
    total = len(vec)
    raw = wire.pack_part(vec, 0, total)
    assert "expected int8 x" in wire.open_part(raw[:-1], 0, total, total)[1]
    bad = bytearray(raw)
    bad[3] = 0x80  # -128: outside the symmetric range
    part, why = wire.open_part(bytes(bad), 0, total, total)
    assert why is None and "outside" in wire.check(0, part, 0, total)
    fresh = Int8Wire(expects, c.shared)
    lanes = bytearray(raw)
    lanes[-16] ^= 1  # a check lane (int64) that does not carry its salt
    assert "salt" in fresh.check(0, fresh.open_part(bytes(lanes), 0, total, total)[0], 0, total)
    assert wire.open_result(b"\0" * 3, 0, total, total, 1) is None


def test_bad_scales_are_refused_and_do_not_count():
    rng = np.random.default_rng(6)
    members = [member(rng) for _ in range(3)]
    contribs, gathers = map(list, zip(*members))
    blocks = blocks_of(VALUES)
    gathers[1] = {**gathers[1], "exps": np.full(blocks, 30, dtype=np.int8).tobytes()}  # coarsen everyone's steps
    gathers[2] = {**gathers[2], "exps": b"\0"}                                          # malformed
    refused, shared = group_scales(gathers, expectations(gathers, CLIP, None), blocks)
    assert refused[0].refuse is None and "budget" in refused[1].refuse and "scales" in refused[2].refuse
    assert np.array_equal(shared, contribs[0].exponents)  # only the sound announcement sets the scales


def test_exact_wire_is_the_old_protocol():
    v = np.arange(10, dtype=np.float64)
    w = ExactWire([None])
    assert w.pack_part(v, 0, 10) == v.astype("<f8").tobytes()
    assert w.pack_result(v * 3, 0, 10, 3) == (v * 3 / 3.0).astype("<f8").tobytes()
    assert "float64 x 10" in w.open_part(b"\0" * 8, 0, 10, 10)[1]


def test_config_fingerprint_and_transport():
    from swarm.config import RunConfig

    assert RunConfig().fingerprint() == "e13c1cfcbbeed2ce"  # the default run's, before the codec existed
    int8 = RunConfig.model_validate({"averaging": {"codec": "int8"}})
    assert int8.fingerprint() != RunConfig().fingerprint()
    assert transport_refusal("int8", "tcp") is None and transport_refusal("exact", "hivemind") is None
    assert "--transport tcp" in transport_refusal("int8", "hivemind")
    with pytest.raises(Exception):
        RunConfig.model_validate({"averaging": {"codec": "int4"}})


def _int8_config(tmp_path):
    from pathlib import Path

    tiny = (Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml").read_text()
    path = tmp_path / "int8.yaml"
    path.write_text(tiny.replace("name: tiny", "name: tiny-int8") + "averaging:\n  codec: int8\n")
    return path


def test_int8_over_hivemind_is_one_line_before_joining(tmp_path):
    from conftest import run_cli

    res = run_cli("swarm.join", "--config", str(_int8_config(tmp_path)), "--output", str(tmp_path / "out"), timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--transport tcp" in lines[0] and "Traceback" not in res.stderr, res.stderr


@pytest.mark.slow
def test_two_tcp_peers_train_with_int8_and_end_identical(tmp_path):
    import json

    from conftest import metrics, run_cli
    from swarm.averaging import vector_size

    out = tmp_path / "bed"
    res = run_cli("swarm.testbed", "--peers", "2", "--max-rounds", "3", "--output", str(out), "--transport", "tcp",
                  "--config", str(_int8_config(tmp_path)), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["all_adapters_identical"]
    rows = [metrics(out / f"peer{k}" / "metrics.jsonl") for k in range(2)]
    assert [m["round"] for m in rows[0]] == [1, 2, 3] == [m["round"] for m in rows[1]]
    for a, b in zip(*rows):
        assert a["adapter_sha256"] == b["adapter_sha256"] and a["group_size"] == b["group_size"] == 2
        assert a["bytes_sent"] == b["bytes_received"] and a["bytes_received"] == b["bytes_sent"]  # one link, both ends
    import re

    params = int(re.search(r"(\d+) LoRA params", (out / "peer0" / "log.txt").read_text()).group(1))
    exact = 8 * vector_size(params)  # sent by each of 2 peers: float64, half the vector as parts, half as averages
    for m in rows[0]:
        assert 0.15 < (m["bytes_sent"] + m["bytes_received"]) / (2 * exact) <= 0.25
