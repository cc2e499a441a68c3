"""Held-out evaluation (swarm.evaluation): the split, the shards, the exact group figure; and a real swarm
whose peers all record the same eval_loss, falling over rounds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from swarm import SwarmError
from swarm.config import RunConfig, default_run
from swarm.datasets import Tokenized, load_windows
from swarm.evaluation import Evaluation, combine, eval_shard, holdout, split_tokens


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_holdout_is_a_fixed_rule_on_the_example_count():
    a = holdout(100, 0.1)
    assert len(a) == 10 and (a == np.sort(a)).all() and len(set(a.tolist())) == 10
    assert (holdout(100, 0.1) == a).all()                      # the same on every peer, whatever its --seed
    assert len(holdout(3, 0.01)) == 1 and len(holdout(5, 0.0)) == 0
    with pytest.raises(SwarmError, match="leaves none to train on"):
        holdout(1, 0.5)


def test_split_tokens_holds_out_the_tail_in_whole_windows():
    tokens = np.arange(1000)
    train, held = split_tokens(tokens, 0.2, seq_len=16)
    assert len(train) == 800 and held.ids.shape == ((200 - 1) // 16, 17) and held.loss_mask.all()
    assert held.ids.min() >= 800                                # never a training token
    assert (held.ids[1, 0] == held.ids[0, -1])                  # consecutive windows share one boundary token
    with pytest.raises(SwarmError, match="raise data.eval_fraction"):
        split_tokens(tokens, 0.01, seq_len=16)


def test_held_out_examples_are_never_in_training_windows(tmp_path):
    from swarm.model import resolve_model_dir

    rows = [{"prompt": f"Q{i}?", "completion": f" answer {i:03d}."} for i in range(40)]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    model_dir = resolve_model_dir(default_run().model)
    train, held = load_windows(str(f), "auto", "pad", None, model_dir, 32, eval_fraction=0.25)
    assert len(train.ids) == 30 and len(held.ids) == 10
    text = lambda t: {bytes(int(x) - 4 for x in r if 4 <= x < 260).decode(errors="ignore") for r in t.ids}  # noqa: E731
    assert not text(train) & text(held)
    wanted = {f" answer {i:03d}." for i in holdout(40, 0.25)}
    assert {s for s in wanted if any(s in h for h in text(held))} == wanted
    ptrain, pheld = load_windows(str(f), "auto", "pack", None, model_dir, 32, eval_fraction=0.25)  # packed apart
    packed = " ".join(text(ptrain))
    assert not [s for s in wanted if s in packed] and [s for s in wanted if any(s in h for h in text(pheld))]
    plain = tmp_path / "p.txt"
    plain.write_text("some text " * 200)
    t2, h2 = load_windows(str(plain), "text", "pack", None, model_dir, 32, eval_fraction=0.1)
    assert len(h2.ids) == round(0.1 * (len(t2.ids) + len(h2.ids)))
    assert load_windows(str(f), "auto", "pad", None, model_dir, 32)[1] is None


def test_eval_shards_cover_the_split_once():
    shards = [eval_shard(10, i, 3) for i in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]
    assert [len(eval_shard(2, i, 3)) for i in range(3)] == [1, 1, 0]


def _part(i, loss, tokens, of=3, r=4, plan="p"):
    return {"round": r, "plan": plan, "index": i, "of": of, "loss_sum": loss, "tokens": tokens}


def test_combine_is_exact_complete_and_order_free():
    parts = {"c": _part(2, 0.3, 3), "a": _part(0, 1.1, 7), "b": _part(1, 2.7, 5)}
    res = combine(parts, eval_round=4, plan_id="p", of=3, expected_tokens=[7, 5, 3])
    assert res.loss == ((1.1 + 2.7) + 0.3) / 15 and res.tokens == 15
    flipped = dict(reversed(list(parts.items())))
    assert combine(flipped, eval_round=4, plan_id="p", of=3, expected_tokens=[7, 5, 3]).loss == res.loss  # bit for bit
    assert combine(parts, eval_round=4, plan_id="p", of=3, expected_tokens=None).loss == res.loss  # private data
    for bad, why in [({**parts, "b": None}, "shard(s) [1] of 3"),
                     ({**parts, "b": _part(1, 2.7, 6)}, "bad eval record"),            # not its shard's tokens
                     ({**parts, "b": _part(0, 2.7, 5)}, "bad eval record"),            # a shard twice
                     ({**parts, "b": _part(1, float("nan"), 5)}, "bad eval record"),
                     ({**parts, "b": _part(1, 2, 5)}, "bad eval record"),              # not a float
                     ({**parts, "b": _part(1, 2.7, 5, r=3)}, "evaluated something else"),
                     ({**parts, "b": "junk"}, "evaluated something else")]:
        res = combine(bad, eval_round=4, plan_id="p", of=3, expected_tokens=[7, 5, 3])
        assert res.loss is None and why in res.reason, (bad, res)


class _Backend:
    def __init__(self):
        self.seen = []

    def eval_loss(self, batches):
        self.seen += [b.ids.shape[0] for b in batches]
        return 2.0


def test_evaluation_parts_and_rows_over_a_plan():
    held = Tokenized(np.zeros((5, 9), np.int64), np.ones((5, 8), np.uint8))
    ev = Evaluation(held, every=2)
    plan = NS(peer_ids=("a", "b"), plan_id="p", task_for=lambda p: NS(micro_batch=2))
    assert [ev.eval_round(r) for r in (1, 2, 3, 4, 5)] == [0, None, 2, None, 4]
    assert ev.part(_Backend(), plan, "a", 2) is None                 # not due
    be = _Backend()
    mine = ev.part(be, plan, "a", 3)
    assert mine == {"round": 2, "plan": "p", "index": 0, "of": 2, "loss_sum": 2.0 * 24, "tokens": 24} and be.seen == [2, 1]
    theirs = Evaluation(held, every=2).part(_Backend(), plan, "b", 3)
    out = NS(gathered={"a": {"eval": mine}, "b": {"eval": theirs}})
    assert ev.row(out, plan, 3) == {"eval_loss": 2.0, "eval_round": 2}
    assert ev.row(NS(gathered={"a": {"eval": mine}, "b": {"eval": None}}), plan, 3) == {}   # incomplete: omitted
    assert ev.row(out, plan, 4) == {}
    assert Evaluation(None, every=2).part(_Backend(), plan, "a", 3) is None


def test_eval_config_fields_are_checked_and_agreed(tmp_path):
    from swarm.config import load_config

    base = default_run()
    with_eval = RunConfig.model_validate({"data": {"eval_fraction": 0.1, "eval_every": 2}})
    assert with_eval.fingerprint() != base.fingerprint()            # peers must hold out the same examples
    assert RunConfig.model_validate({"data": {"eval_fraction": 0.0}}).fingerprint() == base.fingerprint()
    for text, msg in [("data: {eval_every: 2}", "data: data.eval_every needs a held-out split: set data.eval_fraction"),
                      ("data: {eval_fraction: 0.9}", "data.eval_fraction: Input should be less than or equal to 0.5"),
                      ("data: {private: true, sha256: " + "a" * 64 + "}", "private data has no shared hash")]:
        f = tmp_path / "c.yaml"
        f.write_text(text)
        with pytest.raises(SwarmError, match=msg) as e:
            load_config(f)
        assert "\n" not in str(e.value)


def test_shipped_eval_config_loads():
    from swarm.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "configs" / "instruct.yaml")
    assert cfg.data.eval_fraction > 0 and cfg.data.eval_every >= 1


def instruction_rows(n: int = 60) -> list[dict]:
    """A small learnable instruction set: a word's letters, spelled out."""
    words = ["apple", "river", "stone", "cloud", "green", "light", "table", "music", "ocean", "plant",
             "house", "bread", "chair", "dream", "flame", "grape", "heart", "lemon", "mouse", "night"]
    return [{"prompt": f"Spell {w}{i}:", "completion": " " + " ".join(f"{w}{i}")} for i in range(n // len(words) + 1)
            for w in words][:n]


def eval_config(tmp_path: Path, data: Path, **train) -> Path:
    import yaml

    from swarm.datasets import file_sha256

    tiny = yaml.safe_load((Path(__file__).parent.parent / "configs" / "tiny.yaml").read_text())
    cfg = {"name": "evaltest", "model": tiny["model"], "lora": tiny["lora"],
           "train": {"seq_len": 32, "micro_batch": 4, "tokens_per_round": 512, "lr": 0.01, **train},
           "data": {"source": str(data), "sha256": file_sha256(data), "format": "jsonl", "packing": "pad",
                    "eval_fraction": 0.2, "eval_every": 1}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_three_peers_record_the_same_eval_loss_and_it_falls(tmp_path):
    """Real processes (swarm.testbed, 3 peers on 127.0.0.1): every round, every peer records the same
    eval_loss for the same eval_round, bit for bit; it falls over the rounds; the report plots it."""
    from conftest import metrics, run_cli

    data = _jsonl(tmp_path / "instr.jsonl", instruction_rows())
    out = tmp_path / "bed"
    res = run_cli("swarm.testbed", "--peers", "3", "--max-rounds", "5", "--config", str(eval_config(tmp_path, data)),
                  "--data", str(data), "--output", str(out), "--threads", "1", timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [metrics(out / f"peer{k}" / "metrics.jsonl") for k in range(3)]
    by_round: dict[int, set] = {}
    for peer_rows in rows:
        for r in peer_rows:
            assert r["data_private"] is False
            if "eval_loss" in r:
                assert r["eval_round"] == r["round"] - 1
                by_round.setdefault(r["eval_round"], set()).add(r["eval_loss"])
    assert sorted(by_round) == [0, 1, 2, 3, 4], by_round          # every round of this run evaluated (the group was whole)
    assert all(len(v) == 1 for v in by_round.values()), by_round  # the same number on every peer
    losses = [next(iter(by_round[r])) for r in sorted(by_round)]
    assert losses[-1] < losses[0] - 0.3, losses                    # it learns the held-out examples' pattern
    assert "eval loss" in (out / "peer1" / "log.txt").read_text()
    assert (out / "plots" / "eval_loss.png").read_bytes().startswith(b"\x89PNG")


def test_private_data_names_no_path_or_hash_and_needs_local_data(tmp_path):
    from swarm.datasets import local_data, network_paths, record_config

    mine = _jsonl(tmp_path / "mine.jsonl", [{"text": "hi"}])
    base = default_run()
    private = RunConfig.model_validate({"name": "fed", "data": {"private": True, "source": "/home/me/diary.jsonl"}})
    record = record_config(private)
    assert record["data"]["source"] == "private" and record["data"]["sha256"] is None and network_paths(record) == []
    assert record_config(base) == base.model_dump(mode="json")
    shared = RunConfig.model_validate({"name": "s", "data": {"source": "/home/me/work/chat.jsonl", "sha256": "a" * 64}})
    assert record_config(shared)["data"]["source"] == "chat.jsonl"                 # the creator's directories stay private
    assert local_data(RunConfig.model_validate(record_config(shared)), mine, from_network=True).data.source == str(mine)
    adopted = local_data(RunConfig.model_validate(record), mine, from_network=True)
    assert adopted.data.source == str(mine) and adopted.data.sha256 is None        # never hashed, never compared
    assert local_data(private, mine, from_network=False).data.sha256 is None
    assert local_data(private, None, from_network=False) == private                # its own config's own path
    need = r"^run 'fed' trains on each peer's private data \(data.private\): pass --data PATH with this peer's own dataset$"
    with pytest.raises(SwarmError, match=need):
        local_data(RunConfig.model_validate(record), None, from_network=True)
    with pytest.raises(SwarmError, match=need):
        local_data(RunConfig.model_validate({"name": "fed", "data": {"private": True}}), None, from_network=False)
    other = RunConfig.model_validate({"name": "fed", "data": {"private": True, "source": "/elsewhere.txt"}})
    assert private.fingerprint() == other.fingerprint() != base.fingerprint()


def test_a_private_run_without_local_data_is_one_line_exit_2(tmp_path):
    from conftest import run_cli

    cfg = tmp_path / "fed.yaml"
    cfg.write_text("name: fed\ndata: {private: true}\n")
    res = run_cli("swarm.join", "--host", "127.0.0.1", "--config", str(cfg), "--max-rounds", "1",
                  "--output", str(tmp_path / "out"), timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        "error: run 'fed' trains on each peer's private data (data.private): pass --data PATH with this peer's own dataset"]


@pytest.mark.slow
def test_private_data_peers_train_their_own_and_agree_on_everything_else(peers, tmp_path):
    """Real peers: `a` starts a private-data run with its --data; `b` adopts it from the network with its own,
    different --data (no --config): the same adapter every round, the same eval_loss, rows say data_private."""
    import yaml

    from conftest import metrics

    rows = instruction_rows(80)
    a_data, b_data = _jsonl(tmp_path / "a.jsonl", rows[:40]), _jsonl(tmp_path / "b.jsonl", rows[40:])
    cfg = yaml.safe_load(eval_config(tmp_path, a_data).read_text())
    cfg["data"].update(private=True, sha256=None, source="unused-see-data")
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(cfg))
    peers.start("a", "--config", str(tmp_path / "fed.yaml"), "--data", str(a_data), "--max-rounds", "3", "--min-peers", "2")
    peers.start("b", "--data", str(b_data), "--max-rounds", "3", initial_peers=peers.addrs("a"))
    assert peers.wait("b", 300) == 0, peers.log("b")[-3000:]
    assert peers.wait("a", 60) == 0, peers.log("a")[-3000:]
    got = {k: {r["round"]: r for r in metrics(tmp_path / k / "metrics.jsonl")} for k in "ab"}
    common = sorted(set(got["a"]) & set(got["b"]))
    assert common and all(got["a"][r]["adapter_sha256"] == got["b"][r]["adapter_sha256"] for r in common)
    assert all(r["data_private"] is True for k in "ab" for r in got[k].values())
    evals = [r for r in common if "eval_loss" in got["a"][r] and "eval_loss" in got["b"][r]]
    assert evals and all(got["a"][r]["eval_loss"] == got["b"][r]["eval_loss"] for r in evals)
    assert str(a_data) not in peers.log("b") and "a.jsonl" not in (tmp_path / "b" / "network.log").read_text()
