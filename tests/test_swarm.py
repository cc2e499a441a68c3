"""Real swarms: peer processes talking over 127.0.0.1, once per transport (`transport` fixture: hivemind with NAT
port mapping off, and tcp)."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from conftest import metrics, run_cli, transport_args

pytestmark = pytest.mark.slow


def _hashes_by_round(files) -> dict[int, set[str]]:
    by_round: dict[int, set[str]] = {}
    for f in files:
        for m in metrics(f):
            by_round.setdefault(m["round"], set()).add(m["adapter_sha256"])
    return by_round


def test_testbed_three_peers_identical_every_round_and_loss_falls(tmp_path, transport):
    out = tmp_path / "bed"
    res = run_cli("swarm.testbed", "--peers", "3", "--max-rounds", "5", "--output", str(out), *transport_args(transport),
                  timeout=420)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["all_adapters_identical"]
    assert [p["exit_code"] for p in summary["peers"]] == [0, 0, 0]
    files = [out / f"peer{k}" / "metrics.jsonl" for k in range(3)]
    by_round = _hashes_by_round(files)
    assert sorted(by_round) == [1, 2, 3, 4, 5]
    assert all(len(h) == 1 for h in by_round.values()), by_round       # identical after every round
    for f in files:
        ms = metrics(f)
        assert {"round", "loss", "tokens", "group_size", "seconds", "wait_seconds", "backend", "adapter_sha256",
                "quota_tokens", "micro_batch", "accumulation_steps", "plan_id"} <= set(ms[0])
        assert ms[-1]["loss"] < ms[0]["loss"] - 0.2                    # it learns
        assert all(m["group_size"] == 3 for m in ms)
        assert all(m["backend"] == "torch" for m in ms)
    # the testbed drew the run's plots (swarm.report) and printed their paths
    plots = ["loss.png", "round_time.png", "plan.png", "throughput.png"]
    assert "testbed: 4 plots in" in res.stdout and all(str(out / "plots" / p) in res.stdout for p in plots), res.stdout[-2000:]
    assert all((out / "plots" / p).read_bytes().startswith(b"\x89PNG") for p in plots)
    from swarm.report import events, find_metrics, load_peers, time_split

    series = load_peers(find_metrics([out]))
    assert [p.label for p in series] == ["peer0", "peer1", "peer2"] and events(series) == []  # nobody joined, left, cheated
    for m in metrics(files[0]):                                        # a round's parts add up to its seconds
        assert abs(sum(time_split(m).values()) - m["seconds"]) < 0.01 and m["idle_seconds"] == 0.0
    from swarm.averaging import vector_size

    params = int(re.search(r"(\d+) LoRA params", (out / "peer0" / "log.txt").read_text()).group(1))
    butterfly = 8 * vector_size(params) * 2 * (3 - 1) / 3  # float64 parts out and deltas back, to 2 of 3 reducers
    rows = [metrics(f) for f in files]  # reducers' shares come in whole 512 KiB parts, so peers differ; the group adds up
    for by_peer in zip(*rows):
        for field in ("bytes_sent", "bytes_received"):
            assert 1.0 < sum(m[field] for m in by_peer) / (3 * butterfly) < 1.05, [m[field] for m in by_peer]
        for m in by_peer:
            assert m["compute_seconds"] == m["train_seconds"] and 0 < m["comm_seconds"] <= m["wait_seconds"]
    cfg = json.loads((out / "peer0" / "adapter" / "adapter_config.json").read_text())
    from transformers import AutoConfig

    AutoConfig.from_pretrained(cfg["base_model_name_or_path"])        # a directory transformers loads


def test_late_joiner_downloads_state_and_matches(peers, transport):
    common = ["--max-rounds", "16"]
    peers.start("a", *common, "--min-peers", "2")
    addrs = peers.addrs("a")
    peers.start("b", *common, "--min-peers", "2", initial_peers=addrs)
    end = time.monotonic() + 180
    while time.monotonic() < end and len(metrics(peers.base / "a" / "metrics.jsonl")) < 2:
        time.sleep(0.5)
    assert len(metrics(peers.base / "a" / "metrics.jsonl")) >= 2, peers.log("a")
    peers.start("c", *common, initial_peers=addrs)
    for name in "abc":
        assert peers.wait(name, timeout=240) == 0, peers.log(name)
    late = metrics(peers.base / "c" / "metrics.jsonl")
    assert late and late[0]["round"] > 2, late[:1]                     # it joined mid-run...
    trained = [m["round"] for m in late]                                # ...contributed from then on (a round it
    assert len(trained) >= 16 - trained[0], trained                     # lost to a race at most: it catches up)
    assert "downloaded state of round" in peers.log("c")
    from swarm.adapters import adapter_sha256, load_peft_adapter
    from swarm.checkpoint import META_FILE

    finals = {adapter_sha256(load_peft_adapter(peers.base / n / "adapter")) for n in "abc"}
    assert len(finals) == 1                                             # ...and ends on the same adapter
    assert finals == {metrics(peers.base / "a" / "metrics.jsonl")[-1]["adapter_sha256"]}
    assert json.loads((peers.base / "c" / "checkpoint" / META_FILE).read_text())["round"] == 16
    by_round = _hashes_by_round([peers.base / n / "metrics.jsonl" for n in "abc"])
    assert all(len(h) == 1 for h in by_round.values())
    plans: dict[int, set[tuple]] = {}                                   # every peer planned every round alike,
    for n in "abc":                                                     # the joiner too (it downloaded the pace)
        for m in metrics(peers.base / n / "metrics.jsonl"):
            plans.setdefault(m["round"], set()).add((m["plan_id"], m["deadline_seconds"]))
    assert all(len(p) == 1 for p in plans.values()), {r: p for r, p in plans.items() if len(p) > 1}


def test_one_swarm_round_equals_single_process_weighted_average(peers, transport):
    """Same data, same global batch: the swarm's round-1 adapter = one process averaging by tokens."""
    peers.start("a", "--max-rounds", "1", "--min-peers", "2")
    peers.start("b", "--max-rounds", "1", "--min-peers", "2", initial_peers=peers.addrs("a"))
    assert peers.wait("a", 180) == 0 and peers.wait("b", 180) == 0
    rounds = [metrics(peers.base / n / "metrics.jsonl")[0] for n in "ab"]

    from swarm.adapters import load_peft_adapter
    from swarm.averaging import clip_by_norm, flatten, unflatten
    from swarm.backends import load_backend
    from swarm.config import default_run
    from swarm.data import corpus_tokens, peer_key, sample_batches
    from swarm.model import resolve_model_dir

    run = default_run()
    model_dir = resolve_model_dir(run.model)
    tokens = corpus_tokens(run.data.source, model_dir)
    backend = load_backend("torch", run=run, model_dir=model_dir, threads=1, seed=0)
    names = backend.adapter_names()
    shapes = {n: a.shape for n, a in backend.get_adapter().items()}
    total, weighted = 0, None
    for r in rounds:
        batches = sample_batches(tokens, run.train.seq_len, r["quota_tokens"] // run.train.seq_len, r["micro_batch"],
                                 0, 1, peer_key(r["peer"]))
        if r["cut_short"]:  # the peer reached the round's deadline: it trained a prefix of its micro-batches
            done = list(np.cumsum([b[:, 1:].size for b in batches]))
            batches = batches[:done.index(r["tokens"]) + 1]
        res = backend.train(batches)
        assert res.tokens == r["tokens"]
        g, _ = clip_by_norm(flatten(res.grads, names), run.train.max_grad_norm)
        weighted = g * res.tokens if weighted is None else weighted + g * res.tokens
        total += res.tokens
    backend.apply_update(unflatten(weighted / total, names, shapes))
    # The averaged gradient itself: after one AdamW step, exp_avg = (1 - beta1) * g on both sides.
    from swarm.checkpoint import load

    ours = load(peers.base / "a" / "checkpoint", {n: tuple(s) for n, s in shapes.items()}, run.fingerprint())
    expected_m = backend.get_optimizer().exp_avg
    scale = max(float(np.max(np.abs(expected_m[n]))) for n in names)
    grad_err = max(float(np.max(np.abs(expected_m[n] - ours.optimizer.exp_avg[n]))) for n in names)
    assert grad_err < 1e-5 * scale, (grad_err, scale)                   # fp32 noise
    # The adapter: AdamW's first step is ~lr * sign(g), so gradients within fp32 noise of zero may flip a step.
    expected = backend.get_adapter()
    got = load_peft_adapter(peers.base / "a" / "adapter")
    worst = max(float(np.max(np.abs(expected[n] - got[n]))) for n in names)
    assert worst < 1e-2 * run.train.lr, worst
