"""Members compare signed hashes of the result before commit (swarm.verify): pure parts, with a fake transport."""

from __future__ import annotations

import numpy as np

from swarm.transport.base import Record
from swarm.verify import (
    SKETCH_PRIME, agree_on_result, attempt_id, check_sketches, compare, integers, sketch, sketch_seed, span_hashes,
)


class _Board:
    """A DHT stand-in: put/get by owner."""

    def __init__(self):
        self.values = {}

    def as_peer(self, me):
        board = self

        class T:
            peer_id = me

            def put(self, key, value, ttl):
                board.values[(key, me)] = value
                return True

            def get(self, key):
                return [Record(owner=o, value=v, expiration=0.0) for (k, o), v in board.values.items() if k == key]

        return T()


SPANS = {"a": (0, 4), "b": (4, 8), "x": (8, 12)}


def report(result, contribution, spans, group, update="u", attempt=""):
    """The record an honest member publishes for `result` (raw averages) and its own `contribution`."""
    parts = span_hashes(result, spans, len(group))
    return {"update": update, "parts": parts, "members": group, "attempt": attempt,
            "sketch": sketch(contribution, spans, sketch_seed(parts, attempt))}


def test_a_reducer_handing_out_different_spans_is_named_and_nobody_commits():
    board, group = _Board(), ["a", "b", "x"]
    honest = np.arange(12, dtype=np.float64) / 3            # raw averages (sum / group size)
    tampered = honest.copy()
    tampered[9] += 1 / 3                                      # one fixed-point unit in x's span, for a only
    kw = dict(key="k", members=group, spans=SPANS, leader="x", wait=0.5, sleep=lambda s: None)
    board.as_peer("b").put("k", {"update": "u1", "parts": span_hashes(honest, SPANS, 3), "members": group}, 60)
    why, offenders = agree_on_result(board.as_peer("a"), digest="u2", result=tampered, contribution=np.zeros(12), **kw)
    assert "reducer(s) x handed members different results" in why and set(offenders) == {"x"}
    why, offenders = agree_on_result(board.as_peer("b"), digest="u1", result=honest, contribution=np.zeros(12), **kw)
    assert why and set(offenders) == {"x"}                    # b sees a's report: the same verdict


def test_equal_results_commit_and_rounding_noise_is_not_a_difference():
    board, group = _Board(), ["a", "b"]
    raw = np.arange(8, dtype=np.float64) / 2                 # the sums 0..7 of two contributions
    noisy = raw + 1e-12                                       # (avg - part) + part is not bit-exact in float
    spans = {"a": (0, 4), "b": (4, 8)}
    xa, xb = np.arange(8, dtype=np.float64) - 3, np.full(8, 3.0)
    board.as_peer("b").put("k", report(noisy, xb, spans, group), 60)
    assert agree_on_result(board.as_peer("a"), key="k", members=group, digest="u", result=raw, contribution=xa,
                           spans=spans, leader=None, wait=0.5, sleep=lambda s: None) == (None, {})


def test_silence_and_ambiguity():
    board, group = _Board(), ["a", "b", "c"]
    raw = np.zeros(12)
    clock = iter(range(100)).__next__
    why, offenders = agree_on_result(board.as_peer("a"), key="k", members=group, digest="u", result=raw, spans=SPANS,
                                     contribution=raw, leader=None, wait=2, clock=clock, sleep=lambda s: None)
    assert "only 1 of 3 members confirmed" in why and offenders == {}
    mine = {"update": "u", "parts": {"a": "1", "b": "2"}}
    assert compare(mine, {"update": "v", "parts": {"a": "9", "b": "8"}}, me="a", peer="b")[1] == {}  # two spans differ
    assert compare(mine, {"update": "v", "parts": dict(mine["parts"])}, me="a", peer="b")[1] == {}
    assert compare(mine, dict(mine), me="a", peer="b") is None


def test_a_members_record_of_an_earlier_attempt_is_not_its_report_of_this_one():
    """The same members retry a round: b's record of the last attempt (another result) is still in the DHT when a
    checks this attempt's. a must wait for b's report of this attempt, not refuse the result b is about to commit."""
    board, group = _Board(), ["a", "b"]
    spans = {"a": (0, 4), "b": (4, 8)}
    first = {"a": {"arrived": 10.0}, "b": {"arrived": 10.5}}
    second = {"a": {"arrived": 31.0}, "b": {"arrived": 30.5}}
    assert attempt_id(first) != attempt_id(second) == attempt_id(dict(reversed(list(second.items()))))
    old, new = np.arange(8, dtype=np.float64) / 2, np.arange(8, dtype=np.float64) / 2 + 1
    xb = np.ones(8)
    board.as_peer("b").put("k", report(old, xb, spans, group, "old", attempt_id(first)), 60)
    clock = iter(range(100)).__next__
    kw = dict(key="k", members=group, digest="new", result=new, contribution=integers(new, 2) - xb, spans=spans,
              leader=None, wait=2, attempt=attempt_id(second))
    why, offenders = agree_on_result(board.as_peer("a"), clock=clock, sleep=lambda s: None, **kw)
    assert why.startswith("only 1 of 2 members confirmed the result (missing: b;") and offenders == {}  # not "differ"
    board.as_peer("b").put("k", report(new, xb, spans, group, "new", attempt_id(second)), 60)
    assert agree_on_result(board.as_peer("a"), sleep=lambda s: None, **kw) == (None, {})


def test_a_reducer_handing_every_member_the_same_wrong_span_fails_the_value_check():
    """Scenario 1's other half: x adds one fixed-point unit to its span for everyone. Every member's hashes agree,
    but the sketches of the members' contributions do not add up to the result's: nobody commits, x is named."""
    board, group = _Board(), ["a", "b", "x"]
    rng = np.random.default_rng(1)
    sent = {p: rng.integers(-(1 << 40), 1 << 40, 12).astype(np.float64) for p in group}
    honest = sum(sent.values()) / 3
    tampered = honest.copy()
    tampered[9] += 1 / 3                                      # the same wrong span for every member
    for p in ("b", "x"):
        board.as_peer(p).put("k", report(tampered, sent[p], SPANS, group), 60)
    why, offenders = agree_on_result(board.as_peer("a"), key="k", members=group, digest="u", result=tampered,
                                     contribution=sent["a"], spans=SPANS, leader="x", wait=0.5, sleep=lambda s: None)
    assert "reducer(s) x handed every member a result that is not the sum" in why and set(offenders) == {"x"}
    # the honest result passes the same check
    board2 = _Board()
    for p in ("b", "x"):
        board2.as_peer(p).put("k", report(honest, sent[p], SPANS, group), 60)
    assert agree_on_result(board2.as_peer("a"), key="k", members=group, digest="u", result=honest, contribution=sent["a"],
                           spans=SPANS, leader="x", wait=0.5, sleep=lambda s: None) == (None, {})
    # a member that publishes no sketch (or a malformed one) fails the check for every span, naming nobody alone
    board3 = _Board()
    board3.as_peer("b").put("k", report(honest, sent["b"], SPANS, group), 60)
    board3.as_peer("x").put("k", {**report(honest, sent["x"], SPANS, group), "sketch": {"a": ["1", 2]}}, 60)
    why, offenders = agree_on_result(board3.as_peer("a"), key="k", members=group, digest="u", result=honest,
                                     contribution=sent["a"], spans=SPANS, leader="x", wait=0.5, sleep=lambda s: None)
    assert "value check" in why and offenders == {}


def test_sketches_are_linear_exact_and_move_with_any_change():
    rng = np.random.default_rng(2)
    spans = {"p": (0, 700), "q": (700, 1500), "r": (1500, 2500)}
    xs = [rng.integers(-(1 << 49), 1 << 49, 2500).astype(np.float64) for _ in range(4)]
    total = sum(xs)                                           # exact: |sum| < 2^51
    seed = 12345
    assert check_sketches(sketch(total, spans, seed), [sketch(x, spans, seed) for x in xs]) == []
    for i in (0, 699, 700, 2499):                             # one unit anywhere is caught, in its own span only
        bumped = total.copy()
        bumped[i] += 1
        bad = check_sketches(sketch(bumped, spans, seed), [sketch(x, spans, seed) for x in xs])
        assert bad == [next(p for p, (a, b) in spans.items() if a <= i < b)]
    assert all(0 <= v < SKETCH_PRIME for rows in sketch(total, spans, seed).values() for v in rows)
    assert sketch(total, spans, seed) != sketch(total, spans, seed + 1)  # the seed decides the coefficients
