"""Formats, loss masks, packing/padding, sharding and bad-data errors of swarm.datasets (pure parts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from swarm import SwarmError
from swarm.config import default_run
from swarm.datasets import (file_sha256, read_examples, round_shard, tokenize_example, verify_hash,
                            windows)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from swarm.model import resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(default_run().model)))


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_prompt_tokens_carry_no_loss(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2? A:", "completion": " 4"}])
    ids, mask = tokenize_example(read_examples(f)[0], tok)
    n_prompt = len(tok("Q: 2+2? A:", add_special_tokens=False)["input_ids"])
    assert mask[:n_prompt] == [0] * n_prompt and all(mask[n_prompt:])
    assert ids[-1] == tok.eos_token_id and len(ids) == len(mask)


def test_text_records_and_plain_text_carry_loss_everywhere(tmp_path, tok):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    (tmp_path / "p.txt").write_text("hello world")
    for path in (f, tmp_path / "p.txt"):
        _, mask = tokenize_example(read_examples(path)[0], tok)
        assert all(mask)


def test_chat_needs_a_template_and_masks_user_turns(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    f = _jsonl(tmp_path / "c.jsonl", rows)
    ex = read_examples(f)[0]
    with pytest.raises(SwarmError, match="chat template"):
        tokenize_example(ex, tok)
    tok2 = tok.__class__.from_pretrained(tok.name_or_path)
    tok2.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}")
    ids, mask = tokenize_example(ex, tok2)
    text = tok2.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
    assert text == "<assistant>yo\n" and "hi" not in text


def test_pack_and_pad_windows_keep_the_mask_aligned(tmp_path, tok):
    rows = [{"prompt": "p" * 5, "completion": "c" * 7}] * 6
    ex = read_examples(_jsonl(tmp_path / "d.jsonl", rows))
    packed = windows(ex, tok, seq_len=16, packing="pack")
    assert packed.ids.shape[1] == 17 and packed.loss_mask.shape[1] == 16
    c = tok("c", add_special_tokens=False)["input_ids"][0]
    p = tok("p", add_special_tokens=False)["input_ids"][0]
    targets = packed.ids[:, 1:]
    assert (targets[packed.loss_mask == 1] != p).all() and (targets[targets == c] >= 0).all()
    assert (packed.loss_mask[targets == c] == 1).all() and (packed.loss_mask[targets == p] == 0).all()
    padded = windows(ex, tok, seq_len=16, packing="pad")
    assert padded.ids.shape == (6, 17) and padded.loss_tokens == 6 * 8  # 7 completion + EOS
    assert (padded.ids[:, 14:] == tok.pad_token_id).all() and not padded.loss_mask[:, 13:].any()


def test_parquet_file_and_directory(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    t = pa.table({"prompt": ["a", "b"], "completion": ["x", "y"]})
    (tmp_path / "ds").mkdir()
    pq.write_table(t, tmp_path / "ds" / "train-0.parquet")
    pq.write_table(t, tmp_path / "one.parquet")
    assert len(read_examples(tmp_path / "one.parquet")) == 2
    assert len(read_examples(tmp_path / "ds")) == 2


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: malformed JSON"),
    ('{"prompt": "x"}', "line 2: \"prompt\" and \"completion\" must both be strings"),
    ('{"foo": 1}', "line 2: missing fields"),
    ('{"prompt": "x", "completion": ""}', "line 2: empty \"completion\""),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant turn"),
    ("[1, 2]", "line 2: expected a JSON object"),
])
def test_bad_lines_are_one_line_errors_naming_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(SwarmError, match="bad.jsonl " + message.replace("+", r"\+")) as e:
        read_examples(f)
    assert "\n" not in str(e.value)


def test_a_prompt_filling_the_window_is_empty_after_masking(tmp_path, tok):
    ex = read_examples(_jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * 40, "completion": "c"}]))
    with pytest.raises(SwarmError, match="line 1: empty after masking"):
        windows(ex, tok, seq_len=16, packing="pad")


def test_hash_is_checked(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("abc")
    verify_hash(f, file_sha256(f))
    with pytest.raises(SwarmError, match="is not the run's dataset"):
        verify_hash(f, "0" * 64)


def test_round_shards_are_disjoint_deterministic_and_cover_the_quotas():
    quotas = [3, 5, 2]
    shards = [round_shard(20, seed=1, round_=4, member_index=i, quotas=quotas) for i in range(3)]
    assert [len(s) for s in shards] == quotas
    allw = np.concatenate(shards)
    assert len(set(allw.tolist())) == 10
    assert (round_shard(20, 1, 4, 1, quotas) == shards[1]).all()
    assert not (round_shard(20, 1, 5, 1, quotas) == shards[1]).all()


def test_network_paths_names_every_local_path_a_record_would_open():
    from swarm.datasets import network_paths

    run = default_run().model_dump(mode="json")
    assert network_paths(run) == []
    lure = {**run, "data": {"source": "/home/me/diary.txt"}, "model": {**run["model"], "path": "/home/me/m"}}
    assert network_paths(lure) == ["data.source='/home/me/diary.txt'", "model.path='/home/me/m'"]
    assert network_paths({"data": "junk", "model": None}) == []


def test_a_peer_trains_on_an_instruction_dataset_with_masked_tokens(tmp_path):
    """One real peer, 2 rounds, on a JSONL prompt/completion file named by its hash: the round's tokens
    are the loss-carrying ones; a wrong hash is one line naming the file, exit 2, nothing trained."""
    from conftest import metrics, run_cli
    from swarm.datasets import file_sha256

    data = _jsonl(tmp_path / "instr.jsonl", [{"prompt": f"Q{i}: what is {i}+{i}? A:", "completion": f" {2 * i}."}
                                             for i in range(40)])
    import yaml

    cfg = tmp_path / "instr.yaml"  # configs/instruct.yaml with this copy's path and hash
    shipped = yaml.safe_load((Path(__file__).parent.parent / "configs" / "instruct.yaml").read_text())
    shipped["data"].update(source=str(data), sha256=file_sha256(data))
    cfg.write_text(yaml.safe_dump(shipped))
    res = run_cli("swarm.join", "--host", "127.0.0.1", "--config", str(cfg), "--max-rounds", "2",
                  "--output", str(tmp_path / "out"), "--threads", "1", timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0 < r["tokens"] < 256 for r in rows)  # masked: fewer loss tokens than window tokens
    assert rows[0]["eval_round"] == 0 and rows[0]["eval_loss"] > 0 and "eval_loss" not in rows[1]  # eval_every: 2
    other = _jsonl(tmp_path / "mine.jsonl", [{"text": "not the run's data"}])  # --data: a copy that differs
    res = run_cli("swarm.join", "--host", "127.0.0.1", "--config", str(cfg), "--max-rounds", "1", "--data", str(other),
                  "--output", str(tmp_path / "out2"), "--threads", "1", timeout=240)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "mine.jsonl: sha256" in res.stderr and "pass --data with the run's exact file" in res.stderr
    assert not (tmp_path / "out2" / "metrics.jsonl").exists()


def test_local_data_opens_only_the_peers_own_data_path(tmp_path):
    """--data is the only data a peer opens: a record's data.source is replaced, never read."""
    from swarm.datasets import local_data

    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"text": "hi"}\n')
    sha = file_sha256(mine)
    base = default_run()
    named = base.model_copy(update={"name": "r", "data": base.data.model_copy(
        update={"source": "/home/stranger/secret.jsonl", "sha256": sha, "format": "jsonl"})})
    with pytest.raises(SwarmError, match=rf"^run 'r' trains on dataset {sha[:12]} \(jsonl\): pass --data PATH$"):
        local_data(named, None, from_network=True)
    adopted = local_data(named, mine, from_network=True)
    assert adopted.data.source == str(mine) and adopted.data.sha256 == sha
    unnamed = named.model_copy(update={"data": named.data.model_copy(update={"sha256": None})})
    with pytest.raises(SwarmError, match="not by content hash"):
        local_data(unnamed, mine, from_network=True)
    assert local_data(base, None, from_network=True) == base  # builtin corpus: nothing to pass
    with pytest.raises(SwarmError, match="drop --data"):
        local_data(base, mine, from_network=True)
    own = local_data(base, mine, from_network=False)  # a run of one's own: --data's hash names the dataset
    assert own.data.source == str(mine) and own.data.sha256 == sha


def test_fingerprint_covers_a_named_dataset_only():
    base = default_run()
    assert base.fingerprint() == base.model_copy(update={"data": base.data.model_copy(
        update={"source": "/x.txt", "packing": "pad"})}).fingerprint()  # default fingerprints unchanged
    named = lambda **kw: base.model_copy(update={"data": base.data.model_copy(update={"sha256": "a" * 64, **kw})})  # noqa: E731
    assert named().fingerprint() != base.fingerprint()
    assert named().fingerprint() == named(source="/elsewhere.jsonl").fingerprint()  # the path is each peer's own
    assert len({named().fingerprint(), named(sha256="b" * 64).fingerprint(), named(format="jsonl").fingerprint(),
                named(packing="pad").fingerprint()}) == 4


def test_join_and_testbed_pass_data_paths(tmp_path, capsys):
    from swarm.join import parse_args
    from swarm.testbed import Testbed, parse_args as testbed_args

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("{}"), b.write_text("{}")
    assert parse_args(["--data", str(a)]).data == str(a)
    with pytest.raises(SystemExit) as e:
        parse_args(["--data", str(tmp_path / "missing.jsonl")])
    assert e.value.code == 2 and "--data" in capsys.readouterr().err
    tb = Testbed(testbed_args(["--peers", "2", "--data", f"{a},{b}", "--output", str(tmp_path / "tb")]))
    assert [c[c.index("--data") + 1] for c in (tb.command(0, None), tb.command(1, None))] == [str(a), str(b)]
    tb = Testbed(testbed_args(["--peers", "2", "--data", str(a), "--output", str(tmp_path / "tb")]))
    assert tb.command(1, None)[tb.command(1, None).index("--data") + 1] == str(a)
    with pytest.raises(SwarmError, match="3 values for 2 peers"):
        Testbed(testbed_args(["--peers", "2", "--data", f"{a},{b},{a}", "--output", str(tmp_path / "tb")]))


def test_a_rounds_peers_train_disjoint_shards_in_the_plans_order():
    from types import SimpleNamespace as NS

    from swarm.datasets import Tokenized, shard_batches

    data = Tokenized(np.arange(30 * 5).reshape(30, 5).astype(np.int64), np.ones((30, 4), np.uint8))
    tasks = (NS(peer_id="a", sequences=4, micro_batch=3), NS(peer_id="b", sequences=6, micro_batch=4))
    plan = NS(tasks=tasks, peer_ids=("a", "b"))
    a, b = (shard_batches(data, plan, p, seed=0, round_=3) for p in ("a", "b"))
    assert [len(x.ids) for x in a] == [3, 1] and [len(x.ids) for x in b] == [4, 2]
    rows = lambda bs: {int(r[0]) for x in bs for r in x.ids}  # noqa: E731
    assert len(rows(a)) == 4 and len(rows(b)) == 6 and not rows(a) & rows(b)
    assert rows(shard_batches(data, plan, "a", seed=0, round_=3)) == rows(a)
    assert rows(shard_batches(data, plan, "a", seed=0, round_=4)) != rows(a)


def test_a_joiner_adopts_a_hashed_dataset_run_only_with_its_own_data(peers, tmp_path):
    """Real peers: `a` starts configs/instruct.yaml with --data (its hash becomes the run's data.sha256);
    `j` joins with no --config and its own copy at another path and trains; `n` names the run without
    --data and gets one line saying which dataset to pass, exit 2."""
    import shutil

    from conftest import metrics

    mine = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"Q{i}: {i}+1?", "completion": f" {i + 1}."} for i in range(30)])
    copy = tmp_path / "j-copy" / "data.jsonl"
    copy.parent.mkdir()
    shutil.copy(mine, copy)
    config = str(Path(__file__).parent.parent / "configs" / "instruct.yaml")
    peers.start("a", "--config", config, "--data", str(mine), "--max-rounds", "2", "--min-peers", "2")
    addrs = peers.addrs("a")
    peers.start("n", "--run", "instruct", "--max-rounds", "1", initial_peers=addrs)
    peers.start("j", "--data", str(copy), "--max-rounds", "2", initial_peers=addrs)
    assert peers.wait("n", 200) == 2
    assert f"run 'instruct' trains on dataset {file_sha256(mine)[:12]} (jsonl): pass --data PATH" in peers.log("n")
    assert "Traceback" not in peers.log("n")
    assert peers.wait("j", 300) == 0, peers.log("j")[-3000:]
    assert peers.wait("a", 60) == 0, peers.log("a")[-3000:]
    rows = {k: {r["round"]: r["adapter_sha256"] for r in metrics(tmp_path / k / "metrics.jsonl")} for k in "aj"}
    assert 2 in rows["j"] and rows["j"][2] == rows["a"][2]
