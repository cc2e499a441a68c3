"""Measured vs predicted: peak resident memory of real LoRA training steps on this machine.

Each model (Llama-style, built from a config: ~10M, ~50M, ~150M parameters, GQA in the largest)
trains two real steps (torch + peft, CPU, fp32, AdamW on the adapter) in a fresh subprocess, so
its peak RSS is its own. The memory model's prediction for the same shape and settings must be
within 0.8-1.25 of the measurement. On CPU "framework overhead" is the torch runtime's resident
memory, calibrated once in swarm.memory.OVERHEAD["cpu"]; nothing here is per size.

The process pins glibc's mmap threshold first (`swarm.hardware.tune_allocator`, as CPU training
should): without it the peak is 1.3-1.7x the live bytes and differs from run to run.
"""

from __future__ import annotations

import sys

import pytest

from swarm.benchmark import CALIBRATION_MODELS, measure_step_peak
from swarm.memory import ALL_TARGETS, ModelShape, estimate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc"),
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path / "cache"))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("size", list(CALIBRATION_MODELS))
def test_predicted_peak_matches_measured_rss(size):
    pytest.importorskip("peft")
    config, micro_batch, seq_len = CALIBRATION_MODELS[size]
    shape = ModelShape.from_config(config)
    predicted = estimate(shape, "lora", lora_r=8, lora_targets=ALL_TARGETS, micro_batch=micro_batch, seq_len=seq_len,
                         dtype="float32", backend="cpu")
    measured = measure_step_peak(config, micro_batch, seq_len, lora_r=8, targets=ALL_TARGETS, steps=2, threads=2)
    assert measured["params"] == shape.param_count() + predicted.trainable_params
    ratio = measured["peak_rss_bytes"] / predicted.total
    print(f"{size}: measured {measured['peak_rss_bytes'] / 2**20:.0f} MiB, predicted {predicted.total / 2**20:.0f} MiB, "
          f"ratio {ratio:.3f} (runtime {measured['runtime_rss_bytes'] / 2**20:.0f} MiB)")
    assert 0.8 <= ratio <= 1.25


_LOAD_CHILD = r"""
import json, sys
from pathlib import Path

from swarm.hardware import tune_allocator

tune_allocator()
from swarm.backends.torch_lora import load_peft_model
from swarm.config import RunConfig
from swarm.precision import PrecisionSettings


def hwm():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


small, big, precision = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
run = RunConfig.model_validate({"name": "load", "model": {"path": str(big)}, "lora": {"r": 8, "alpha": 16.0}})
load_peft_model(run, small, precision=PrecisionSettings(precision))  # the runtime and every import: the baseline
before = hwm()
load_peft_model(run, big, precision=PrecisionSettings(precision))
print(json.dumps({"before": before, "after": hwm()}))
"""


@pytest.mark.timeout(400)
def test_a_converting_load_does_not_hold_the_fp32_checkpoint(tmp_path):
    """Loading an fp32 checkpoint as bf16 reads and converts one tensor at a time: the process's peak grows by the
    bf16 model, not by the fp32 file as well (transformers' mmap loader held the whole file resident: +file +bf16)."""
    pytest.importorskip("peft")
    import json
    import subprocess

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import ROOT, _env

    torch.manual_seed(0)
    n = 0
    for name, hidden, inter, layers in (("small", 64, 128, 1), ("big", 1024, 2816, 6)):
        cfg = Qwen2Config(vocab_size=260, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False)
        model = Qwen2ForCausalLM(cfg)
        n = sum(p.numel() for p in model.parameters())  # the big one: ~67M, a 270 MB fp32 file
        model.save_pretrained(str(tmp_path / name), safe_serialization=True)
        del model
    proc = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(tmp_path / "small"), str(tmp_path / "big"), "bf16"],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = m["after"] - m["before"]
    print(f"bf16 load of a {4 * n / 2**20:.0f} MiB fp32 checkpoint: peak grew {grown / 2**20:.0f} MiB "
          f"(bf16 model {2 * n / 2**20:.0f} MiB)")
    assert grown < 2 * n + 4 * n // 2  # the bf16 model plus slack, well short of the bf16 model + the fp32 file
