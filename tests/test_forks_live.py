"""Rounds never fork, with real peer processes on 127.0.0.1: peers started by hand at random delays
(also on a busy machine), and two swarms that trained apart joined by a peer that knows both."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fork_trials  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("peers,seed,busy", [(5, 11, 0), (3, 12, 2)], ids=["5-peers", "3-peers-busy-cores"])
def test_hand_started_peers_commit_the_same_adapter_every_round(tmp_path, peers, seed, busy):
    res = fork_trials.trial(tmp_path, peers=peers, rounds=18, seed=seed, busy=busy, max_delay=15.0, timeout=480)
    logs = {n: (tmp_path / n / "log.txt").read_text(errors="replace")[-1500:] for n in res["exit"]}
    assert all(code == 0 for code in res["exit"].values()), (res, logs)
    assert res["rounds"] == 18
    # for every round number, every peer that committed it has the same adapter_sha256 in metrics.jsonl
    assert res["forked_rounds"] == [], (res, logs)
    assert res["disk_matches_checkpoint"] and res["final_identical"], res
    rows = {n: fork_trials.read_rows(tmp_path / n) for n in res["exit"]}
    by_round = {}
    for n, rs in rows.items():
        for r in rs:
            by_round.setdefault(r["round"], set()).add(r["lineage"])
    assert all(len(lins) == 1 for lins in by_round.values())        # one state per round on every framework


def test_a_partition_heals_onto_the_heavier_chain(tmp_path):
    res = fork_trials.partition(tmp_path, rounds=24, apart=4, timeout=480)
    logs = {n: (tmp_path / n / "log.txt").read_text(errors="replace")[-2000:] for n in res["exit"]}
    assert all(code == 0 for code in res["exit"].values()), (res, logs)
    assert res["agreed_round"] is not None, (res, logs)
    assert res["forked_rounds_after_agreement"] == [], res
    assert len(set(res["final"].values())) == 1, res
    # one side lost work, and said so (log line and metrics field); the other lost nothing
    losers = {n for n, lost in res["lost_rounds"].items() if lost}
    assert losers and losers in ({"x1", "x2"}, {"y1", "y2"}, {"x1", "x2", "z"}, {"y1", "y2", "z"}), res
    for n in losers:
        assert "forked from a heavier one" in (tmp_path / n / "log.txt").read_text(errors="replace")
        assert res["lost_tokens"][n] > 0
