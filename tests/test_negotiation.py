"""Negotiated task sizes in real swarms, run discovery, and the status tool (127.0.0.1 only)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, metrics, run_cli

pytestmark = pytest.mark.slow


def test_heterogeneous_swarm_quotas_follow_speed_and_micro_batches_fit_memory(tmp_path):
    out = tmp_path / "bed"
    # peer1 computes half the time; peer2 has too little memory for the configured micro-batch of 8
    res = run_cli("swarm.testbed", "--peers", "3", "--max-rounds", "5", "--max-utilization", "1,0.5,1",
                  "--memory-limit", "8,8,0.5", "--output", str(out), timeout=480)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    last = [metrics(out / f"peer{k}" / "metrics.jsonl")[-1] for k in range(3)]
    assert len({m["adapter_sha256"] for m in last}) == 1
    assert last[1]["quota_tokens"] < 0.8 * last[0]["quota_tokens"]          # half speed -> smaller share
    assert last[1]["quota_tokens"] < 0.8 * last[2]["quota_tokens"]
    assert last[0]["micro_batch"] == 8 and last[2]["micro_batch"] < 8       # memory-capped micro-batch
    assert all(m["plan_mode"] == "negotiated" for m in last)
    for m in last:                                                          # the plan is in metrics.jsonl
        assert m["accumulation_steps"] == -(-m["quota_tokens"] // 128 // m["micro_batch"])


def _fits_between(a: str, b: str) -> float:
    """A memory limit (GiB) between the least run a and run b need at micro-batch 1, in the most compact base
    precision each allows that this machine runs (what a joiner sizes runs by: swarm.runs.bytes_needed)."""
    from swarm.config import load_config
    from swarm.memory import ModelShape
    from swarm.model import resolve_model_dir
    from swarm.precision import fit, settings

    need = []
    for name in (a, b):
        run = load_config(ROOT / "configs" / name)
        shape = ModelShape.from_dir(resolve_model_dir(run.model))
        need.append(fit(settings("auto", "cpu"), run, shape, 0).needed_bytes)  # nothing fits 0: the most compact
    assert need[0] < need[1]
    return (need[0] + need[1]) / 2 / 2**30


def test_run_discovery_picks_the_largest_run_that_fits_and_status_lists_both(peers):
    peers.start("tiny", "--config", str(ROOT / "configs" / "tiny.yaml"), "--min-peers", "9")
    addrs = peers.addrs("tiny")
    peers.start("default", "--config", str(ROOT / "configs" / "default.yaml"), "--min-peers", "9", initial_peers=addrs)
    import time

    for _ in range(300):  # wait until the second run is published
        if "waiting for 9 peers" in peers.log("default"):
            break
        time.sleep(0.2)
    peers.start("big", "--max-rounds", "0", initial_peers=addrs)
    assert peers.wait("big", 180) == 0, peers.log("big")
    assert "joining run 'default'" in peers.log("big")
    limit = _fits_between("tiny.yaml", "default.yaml")
    peers.start("small", "--max-rounds", "0", "--memory-limit", f"{limit:.6f}", initial_peers=addrs)
    assert peers.wait("small", 180) == 0, peers.log("small")
    assert "joining run 'tiny'" in peers.log("small")

    res = run_cli("swarm.status", "--initial-peers", *addrs, "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    snap = json.loads(res.stdout)
    runs = {r["name"]: r for r in snap["runs"]}
    assert set(runs) == {"tiny", "default"}
    for r in runs.values():
        assert r["peers"], r
        p = r["peers"][0]
        assert {"peer_id", "tier", "backend", "memory_usable_bytes", "tokens_per_s", "micro_batch", "quota_tokens",
                "round", "last_seen_s"} <= set(p)
        assert p["tier"] == "cpu-only" and p["tokens_per_s"] > 0
        assert r["plan"]["tasks"], r["plan"]
    table = run_cli("swarm.status", "--initial-peers", *addrs, timeout=120)
    assert table.returncode == 0 and "run default" in table.stdout and "run tiny" in table.stdout
