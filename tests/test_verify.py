"""Members compare signed hashes of the result before commit (swarm.verify): pure parts, with a fake transport."""

from __future__ import annotations

import numpy as np

from swarm.transport.base import Record
from swarm.verify import agree_on_result, compare, span_hashes


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


def test_a_reducer_handing_out_different_spans_is_named_and_nobody_commits():
    board, group = _Board(), ["a", "b", "x"]
    honest = np.arange(12, dtype=np.float64) / 3            # raw averages (sum / group size)
    tampered = honest.copy()
    tampered[9] += 1 / 3                                      # one fixed-point unit in x's span, for a only
    kw = dict(key="k", members=group, spans=SPANS, leader="x", wait=0.5, sleep=lambda s: None)
    board.as_peer("b").put("k", {"update": "u1", "parts": span_hashes(honest, SPANS, 3), "members": group}, 60)
    why, offenders = agree_on_result(board.as_peer("a"), digest="u2", result=tampered, **kw)
    assert "reducer(s) x handed members different results" in why and set(offenders) == {"x"}
    why, offenders = agree_on_result(board.as_peer("b"), digest="u1", result=honest, **kw)
    assert why and set(offenders) == {"x"}                    # b sees a's report: the same verdict


def test_equal_results_commit_and_rounding_noise_is_not_a_difference():
    board, group = _Board(), ["a", "b"]
    raw = np.arange(8, dtype=np.float64) / 2
    noisy = raw + 1e-12                                       # (avg - part) + part is not bit-exact in float
    spans = {"a": (0, 4), "b": (4, 8)}
    board.as_peer("b").put("k", {"update": "u", "parts": span_hashes(noisy, spans, 2), "members": group}, 60)
    assert agree_on_result(board.as_peer("a"), key="k", members=group, digest="u", result=raw, spans=spans,
                           leader=None, wait=0.5, sleep=lambda s: None) == (None, {})


def test_silence_and_ambiguity():
    board, group = _Board(), ["a", "b", "c"]
    raw = np.zeros(12)
    clock = iter(range(100)).__next__
    why, offenders = agree_on_result(board.as_peer("a"), key="k", members=group, digest="u", result=raw, spans=SPANS,
                                     leader=None, wait=2, clock=clock, sleep=lambda s: None)
    assert "only 1 of 3 members confirmed" in why and offenders == {}
    mine = {"update": "u", "parts": {"a": "1", "b": "2"}}
    assert compare(mine, {"update": "v", "parts": {"a": "9", "b": "8"}}, me="a", peer="b")[1] == {}  # two spans differ
    assert compare(mine, {"update": "v", "parts": dict(mine["parts"])}, me="a", peer="b")[1] == {}
    assert compare(mine, dict(mine), me="a", peer="b") is None


def test_a_members_record_of_an_earlier_attempt_is_not_its_report_of_this_one():
    """The same members retry a round: b's record of the last attempt (another result) is still in the DHT when a
    checks this attempt's. a must wait for b's report of this attempt, not refuse the result b is about to commit."""
    from swarm.verify import attempt_id

    board, group = _Board(), ["a", "b"]
    spans = {"a": (0, 4), "b": (4, 8)}
    first = {"a": {"arrived": 10.0}, "b": {"arrived": 10.5}}
    second = {"a": {"arrived": 31.0}, "b": {"arrived": 30.5}}
    assert attempt_id(first) != attempt_id(second) == attempt_id(dict(reversed(list(second.items()))))
    old, new = np.arange(8, dtype=np.float64), np.arange(8, dtype=np.float64) + 1
    board.as_peer("b").put("k", {"update": "old", "parts": span_hashes(old, spans, 2), "members": group,
                                 "attempt": attempt_id(first)}, 60)
    clock = iter(range(100)).__next__
    why, offenders = agree_on_result(board.as_peer("a"), key="k", members=group, digest="new", result=new, spans=spans,
                                     leader=None, wait=2, attempt=attempt_id(second), clock=clock, sleep=lambda s: None)
    assert why.startswith("only 1 of 2 members confirmed the result (missing: b;") and offenders == {}  # not "differ"
    board.as_peer("b").put("k", {"update": "new", "parts": span_hashes(new, spans, 2), "members": group,
                                 "attempt": attempt_id(second)}, 60)
    assert agree_on_result(board.as_peer("a"), key="k", members=group, digest="new", result=new, spans=spans,
                           leader=None, wait=2, attempt=attempt_id(second), sleep=lambda s: None) == (None, {})
