"""Faults in real swarms on 127.0.0.1: a peer killed mid-round, a clean SIGTERM, a restart from --output."""

from __future__ import annotations

import signal
import time

import pytest

from conftest import metrics

pytestmark = pytest.mark.slow


def _wait_rounds(peers, name, n, timeout=240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(metrics(peers.base / name / "metrics.jsonl")) >= n:
            return
        if peers.procs[name].poll() is not None:
            raise AssertionError(f"{name} exited:\n{peers.log(name)[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"{name} did not reach {n} rounds:\n{peers.log(name)[-3000:]}")


def test_sigkill_mid_round_then_restart_with_same_output(peers, monkeypatch):
    import json

    from swarm.adapters import adapter_sha256, load_peft_adapter
    from swarm.checkpoint import META_FILE

    common = ["--max-rounds", "12", "--min-peers", "3"]
    peers.start("a", *common)
    addrs = peers.addrs("a")
    peers.start("b", *common, initial_peers=addrs)
    monkeypatch.setenv("SWARM_CHAOS_DIE_IN_ROUND", "3")  # c's whole process group dies in round 3's all-reduce,
    monkeypatch.setenv("SWARM_CHAOS_DIE_AT", "reduce")    # once its group formed and parts are being exchanged
    peers.start("c", *common, initial_peers=addrs)
    monkeypatch.delenv("SWARM_CHAOS_DIE_IN_ROUND")
    monkeypatch.delenv("SWARM_CHAOS_DIE_AT")
    assert peers.wait("c", 240) == -signal.SIGKILL
    _wait_rounds(peers, "a", 5)
    peers.start("c", "--max-rounds", "12", initial_peers=addrs)  # same --output: resumes, downloads, rejoins
    for name in "abc":
        assert peers.wait(name, 300) == 0, peers.log(name)[-3000:]
    ma, mb = (metrics(peers.base / n / "metrics.jsonl") for n in "ab")
    assert [m["round"] for m in ma] == list(range(1, 13)) == [m["round"] for m in mb]  # survivors lost no round
    # c ends with the swarm's final state in its --output, whether it trained the last rounds or
    # (if the survivors finished first) downloaded the final state
    final = json.loads((peers.base / "c" / "checkpoint" / META_FILE).read_text())
    assert final["round"] == 12
    assert ma[-1]["adapter_sha256"] == mb[-1]["adapter_sha256"] == final["adapter_sha256"]
    assert adapter_sha256(load_peft_adapter(peers.base / "c" / "adapter")) == final["adapter_sha256"]
    for m1, m2 in zip(ma, mb):
        assert m1["adapter_sha256"] == m2["adapter_sha256"]
    assert "downloaded state of round" in peers.log("c")
    assert {m["group_size"] for m in ma if m["round"] > 3} >= {2}       # went on without c for a while


def test_sigterm_finishes_the_round_saves_and_exits_zero(peers):
    from swarm.adapters import adapter_sha256, load_peft_adapter

    peers.start("a", "--max-rounds", "10", "--min-peers", "2")
    peers.start("b", "--max-rounds", "10", "--min-peers", "2", initial_peers=peers.addrs("a"))
    _wait_rounds(peers, "b", 3)
    peers.procs["b"].send_signal(signal.SIGTERM)
    assert peers.wait("b", 60) == 0, peers.log("b")[-3000:]
    assert "left after round" in peers.log("b")
    last = metrics(peers.base / "b" / "metrics.jsonl")[-1]
    assert adapter_sha256(load_peft_adapter(peers.base / "b" / "adapter")) == last["adapter_sha256"]
    assert peers.wait("a", 240) == 0, peers.log("a")[-3000:]
    assert metrics(peers.base / "a" / "metrics.jsonl")[-1]["round"] == 10
