"""Unit tests of the pure and local parts: config, default model, data, pacing, checkpoints, records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from swarm import SwarmError
from swarm.backends.base import OptimizerState
from swarm.checkpoint import StateError, TrainingState, load, save
from swarm.config import BuiltinModel, default_run, load_config
from swarm.model import generate_weights, tensors_sha256

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


# --- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name and cfg.train.tokens_per_round >= cfg.train.seq_len


def test_default_yaml_is_the_embedded_default():
    assert load_config(CONFIGS[[p.name for p in CONFIGS].index("default.yaml")]) == default_run()


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 0.1\n  foo: 1\n", "train.foo: unknown key"),
    ("lora:\n  r: -1\n", "lora.r"),
    ("- a\n- b\n", "mapping"),
    ("train: [\n", "not valid YAML"),
])
def test_bad_configs_give_one_line_errors(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(SwarmError, match=message) as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(SwarmError, match="not found"):
        load_config(tmp_path / "nope.yaml")


# --- default model --------------------------------------------------------------------------
def test_default_model_is_deterministic_and_seed_dependent():
    b = BuiltinModel(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    assert tensors_sha256(generate_weights(b)) == tensors_sha256(generate_weights(b))
    assert tensors_sha256(generate_weights(b)) != tensors_sha256(generate_weights(b.model_copy(update={"seed": 1})))


def test_default_model_loads_in_transformers_with_its_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm.model import base_sha256, resolve_model_dir

    run = default_run()
    d = resolve_model_dir(run.model)
    tok = AutoTokenizer.from_pretrained(str(d))
    ids = tok("héllo")["input_ids"]
    assert tok.decode(ids) == "héllo" and max(ids) < run.model.builtin.vocab_size
    model = AutoModelForCausalLM.from_pretrained(str(d))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    assert tensors_sha256(sd) == base_sha256(d)  # what transformers loads is what the hash covers


# --- data -----------------------------------------------------------------------------------
def test_sampling_is_deterministic_per_peer_and_round():
    from swarm.data import sample_batches

    toks = np.arange(10_000, dtype=np.int32)
    a = sample_batches(toks, 16, 10, 4, seed=0, round_=3, key=7)
    assert [b.shape for b in a] == [(4, 17), (4, 17), (2, 17)]
    assert all(np.array_equal(x, y) for x, y in zip(a, sample_batches(toks, 16, 10, 4, 0, 3, 7)))
    assert not np.array_equal(a[0], sample_batches(toks, 16, 10, 4, 0, 3, 8)[0])
    assert not np.array_equal(a[0], sample_batches(toks, 16, 10, 4, 0, 4, 7)[0])


# --- pacing ---------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


@pytest.mark.parametrize("util", [1.0, 0.5, 0.25])
def test_pacer_keeps_compute_at_the_utilization(util):
    from swarm.round import Pacer

    clock = FakeClock()
    pacer = Pacer(range(10), deadline=1e9, max_utilization=util, clock=clock, sleep=clock.sleep)
    for _ in pacer:
        clock.t += 1.0  # one second of compute per micro-batch
    assert clock.t == pytest.approx(10 / util)          # compute is exactly F of the round, last batch included
    assert pacer.slept == pytest.approx(10 * (1 - util) / util)


def test_pacer_stops_at_the_deadline_and_on_stop():
    from swarm.round import Pacer

    clock = FakeClock()
    pacer = Pacer(range(10), deadline=3.5, clock=clock, sleep=clock.sleep)
    n = 0
    for _ in pacer:
        clock.t += 1.0
        n += 1
    assert n == 4 and pacer.cut_short
    assert list(Pacer(range(10), deadline=1e9, stop=lambda: True)) == []


# --- checkpoints ----------------------------------------------------------------------------
def _state(round_=3, step=2):
    rng = np.random.default_rng(0)
    names = {"m.lora_A": (2, 4), "m.lora_B": (4, 2)}
    adapter = {n: rng.normal(size=s).astype(np.float32) for n, s in names.items()}
    opt = OptimizerState(step=step, exp_avg={n: a * 0.1 for n, a in adapter.items()},
                         exp_avg_sq={n: a * a for n, a in adapter.items()})
    return TrainingState(round=round_, adapter=adapter, optimizer=opt, fingerprint="fp"), names


def test_checkpoint_round_trip(tmp_path):
    state, shapes = _state()
    save(tmp_path / "ck", state)
    back = load(tmp_path / "ck", shapes, "fp")
    assert back.round == 3 and back.optimizer.step == 2 and back.adapter_sha256 == state.adapter_sha256
    for n in shapes:
        assert np.array_equal(back.optimizer.exp_avg_sq[n], state.optimizer.exp_avg_sq[n])
    assert load(tmp_path / "absent", shapes, "fp") is None


def test_corrupt_or_foreign_checkpoint_is_a_one_line_error_naming_the_file(tmp_path):
    state, shapes = _state()
    save(tmp_path / "ck", state)
    with pytest.raises(StateError, match="another run"):
        load(tmp_path / "ck", shapes, "other-fingerprint")
    (tmp_path / "ck" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(StateError, match=str(tmp_path / "ck")) as e:
        load(tmp_path / "ck", shapes, "fp")
    assert "\n" not in str(e.value) and "--initial-peers" in str(e.value)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import swarm.adapters as adapters

    state, shapes = _state()
    save(tmp_path / "ck", state)
    real_rename = adapters.os.rename

    def crash(src, dst):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(adapters.os, "rename", crash)
    newer, _ = _state(round_=4)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "ck", newer)
    monkeypatch.setattr(adapters.os, "rename", real_rename)
    assert load(tmp_path / "ck", shapes, "fp").round == 3


def test_a_kill_between_the_two_renames_of_a_save_loses_nothing(tmp_path, monkeypatch):
    """The previous checkpoint was set aside and the new one not yet in place: it is still found."""
    import swarm.adapters as adapters

    state, shapes = _state()
    save(tmp_path / "ck", state)
    real_rename, calls = adapters.os.rename, []

    def crash_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-swap")
        real_rename(src, dst)

    monkeypatch.setattr(adapters.os, "rename", crash_second)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "ck", _state(round_=4)[0])
    monkeypatch.setattr(adapters.os, "rename", real_rename)
    assert not (tmp_path / "ck").exists()                              # the window the kill hit
    assert load(tmp_path / "ck", shapes, "fp").round == 3
    save(tmp_path / "ck", _state(round_=5)[0])                         # and the next save goes on from there
    assert load(tmp_path / "ck", shapes, "fp").round == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]         # no stale copies left behind


_SAVER = """
import sys, numpy as np
from swarm.backends.base import OptimizerState
from swarm.checkpoint import TrainingState, save
rng = np.random.default_rng(0)
adapter = {"m.lora_A": rng.normal(size=(64, 256)).astype(np.float32), "m.lora_B": np.zeros((256, 64), np.float32)}
start = int(sys.argv[2])
print("ready", flush=True)
for r in range(start, start + 100000):
    adapter["m.lora_B"][0, 0] = r
    save(sys.argv[1], TrainingState(round=r, adapter=adapter, optimizer=OptimizerState(step=0), fingerprint="fp"))
"""


def test_sigkill_during_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    """A real process saving checkpoints back to back, SIGKILLed at random moments: every time, the
    checkpoint loads, verified, and it is never older than the one before the kill."""
    import random
    import signal
    import subprocess
    import sys
    import time

    ck, shapes, last = tmp_path / "ck", {"m.lora_A": (64, 256), "m.lora_B": (256, 64)}, 0
    rng = random.Random(7)
    for _ in range(12):
        p = subprocess.Popen([sys.executable, "-c", _SAVER, str(ck), str(last + 1)], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.3))
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
        state = load(ck, shapes, "fp")
        if state is None:  # killed before its first save completed
            assert last == 0
            continue
        assert state.round >= last and state.adapter["m.lora_B"][0, 0] == state.round
        last = state.round
    assert last > 0


def test_state_from_a_peer_is_validated():
    state, shapes = _state()
    meta, arrays = state.to_wire()
    assert TrainingState.from_wire(meta, arrays, shapes, "fp", "p").adapter_sha256 == state.adapter_sha256
    bad = [a.copy() for a in arrays]
    bad[0][0, 0] += 1.0
    with pytest.raises(StateError, match="hash"):
        TrainingState.from_wire(meta, bad, shapes, "fp", "p")
    with pytest.raises(StateError, match="tensors"):
        TrainingState.from_wire(meta, arrays[:-1], shapes, "fp", "p")
    nan = [a.copy() for a in arrays]
    nan[1][0, 0] = np.nan
    with pytest.raises(StateError, match="NaN"):
        TrainingState.from_wire(meta, nan, shapes, "fp", "p")
    with pytest.raises(StateError, match="float32"):
        TrainingState.from_wire(meta, [a.astype(np.float64) for a in arrays], shapes, "fp", "p")
    with pytest.raises(StateError):
        TrainingState.from_wire("not a dict", arrays, shapes, "fp", "p")


def test_the_pace_travels_with_the_state_and_is_validated(tmp_path):
    """A joiner plans its first round from the same speeds and round time as the peers it joins."""
    state, shapes = _state()
    state.speeds, state.round_seconds = {"b": 1234.5, "a": 987.25}, 3.75
    meta, arrays = state.to_wire()
    back = TrainingState.from_wire(meta, arrays, shapes, "fp", "p")
    assert back.speeds == {"a": 987.25, "b": 1234.5} and back.round_seconds == 3.75
    save(tmp_path / "ck", state)
    assert load(tmp_path / "ck", shapes, "fp").speeds == state.speeds
    old = {k: v for k, v in meta.items() if k not in ("speeds", "round_seconds")}  # a state that predates the pace
    assert TrainingState.from_wire(old, arrays, shapes, "fp", "p").speeds == {}
    for bad in ({"speeds": {"a": float("nan")}}, {"speeds": {"a": -1.0}}, {"speeds": {"a": 5}}, {"speeds": [1.0]},
                {"speeds": {f"p{i}": 1.0 for i in range(5000)}}, {"round_seconds": float("inf")},
                {"round_seconds": "3"}, {"round_seconds": -1.0}):
        with pytest.raises(StateError, match="speeds|round_seconds"):
            TrainingState.from_wire({**meta, **bad}, arrays, shapes, "fp", "p")


# --- peft adapter files -----------------------------------------------------------------------
def test_saved_adapter_loads_in_peft_and_matches_the_backend(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from swarm.adapters import load_peft_adapter, save_peft_adapter
    from swarm.backends import load_backend
    from swarm.model import resolve_model_dir

    run = default_run()
    d = resolve_model_dir(run.model)
    backend = load_backend("torch", run=run, model_dir=d, threads=1)
    rng = np.random.default_rng(1)
    tensors = {k: rng.normal(size=v.shape).astype(np.float32) * 0.05 for k, v in backend.get_adapter().items()}
    backend.set_adapter(tensors)
    save_peft_adapter(tmp_path / "adapter", tensors, run, d)
    assert all(np.array_equal(tensors[k], v) for k, v in load_peft_adapter(tmp_path / "adapter").items())
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.arange(4, 36).reshape(1, -1)
    with torch.no_grad():
        ours = backend.model.eval()(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
