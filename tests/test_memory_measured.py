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
