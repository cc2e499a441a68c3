"""Which run a joiner picks (swarm.runs): unit tests of the pure parts, with run records as they come off the network."""

from __future__ import annotations

import pytest

from swarm import SwarmError
from swarm.config import default_run
from swarm.precision import PrecisionSettings
from swarm.records import RunRecord
from swarm.runs import bytes_needed, resolve_run, unadoptable

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}


def _record(name="default", params=7_000_000_000, shape=LLAMA_7B, **data) -> RunRecord:
    cfg = default_run().model_dump(mode="json")
    cfg["name"] = name
    cfg["data"].update(data)
    return RunRecord(name=name, protocol=1, fingerprint="f" * 16, base_sha256="0" * 64, model="m", params=params,
                     config=cfg, model_config_json=shape, created=1.0)


class _Members:
    def __init__(self, runs):
        self._runs = runs

    def runs(self):
        return dict(self._runs)


def test_a_joiner_sizes_a_run_in_the_precision_it_would_train():
    rec = _record()
    fp32 = bytes_needed(rec, "cpu")
    auto = PrecisionSettings(requested="auto", platform="cpu")
    small = bytes_needed(rec, "cpu", auto, 12 * 10 ** 9)      # fp32 and bf16 do not fit 12 GB: nf4 does
    big = bytes_needed(rec, "cpu", auto, 64 * 10 ** 9)        # fp32 fits 64 GB: the most precise option is sized
    forced = bytes_needed(rec, "cpu", PrecisionSettings(precision="fp32", requested="fp32", platform="cpu"), 12 * 10 ** 9)
    assert small < 0.35 * fp32 and big == fp32 == forced
    assert 3.5e9 < small < 12e9        # 4-bit 7B weights are ~3.5 GB; the reference: QLoRA 7B fits a 12-16 GB machine
    assert bytes_needed(_record(shape={"model_type": "nonsense"}), "cpu", auto, 10 ** 12) == 1 << 62  # never picked


def test_records_naming_local_paths_or_unsuppliable_data_are_not_adopted():
    assert unadoptable(_record(), None) is None
    assert "never opens a path" in unadoptable(_record(source="/etc/passwd"), None)
    assert "pass --data" in unadoptable(_record(source="chat.jsonl", sha256="a" * 64), None)


def test_resolve_run_picks_the_largest_fitting_run_and_skips_the_lure(monkeypatch):
    monkeypatch.setattr("swarm.runs.RUN_RECORD_WAIT", 0.1)
    said = []
    small = _record("small", params=100, shape={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000})
    lure = _record("lure", params=10 ** 12, shape=small.model_config_json, source="/root/.ssh/id_rsa")
    run, rec = resolve_run(config=None, name=None, data=None, joining=True, members=_Members({"small": small, "lure": lure}),
                           memory_bytes=8 * 10 ** 9, backend="cpu", say=said.append)
    assert run.name == "small" and rec is small
    assert any("ignoring run 'lure'" in s for s in said)
    with pytest.raises(SwarmError, match="no run named 'x'"):
        resolve_run(config=None, name="x", data=None, joining=True, members=_Members({"small": small}),
                    memory_bytes=8 * 10 ** 9, backend="cpu", say=said.append)
