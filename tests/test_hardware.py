"""Hardware detection with fakes of torch / mlx, tiers, the CLI, and the cached throughput probe."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from swarm import SwarmError
from swarm import hardware as hwmod
from swarm.backends.base import TrainResult
from swarm.benchmark import ThroughputKey, cache_path, cached_throughput, load_cache, measure_throughput, probe_default_throughput
from swarm.hardware import (
    BACKENDS, GiB, TIERS, HardwareProfile, apple_bandwidth, detect, main, tier_for, usable_memory, with_memory_limit,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------- fakes


def fake_torch(cuda=None, hip=None, mps=False, cuda_raises=None, version="2.5.0"):
    """A stand-in for `torch` exposing just the APIs detection uses (torch.cuda, torch.version, torch.backends.mps)."""
    t = types.ModuleType("torch")
    t.__version__ = version
    t.version = types.SimpleNamespace(cuda=None if hip else ("12.4" if cuda else None), hip=hip)

    def is_available():
        if cuda_raises:
            raise cuda_raises
        return cuda is not None

    t.cuda = types.SimpleNamespace(is_available=is_available, device_count=lambda: (cuda or {}).get("count", 1),
                                   get_device_properties=lambda i: types.SimpleNamespace(**{k: v for k, v in (cuda or {}).items() if k != "count"}))
    t.backends = types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: mps))
    return t


def fake_mlx(available=True, info=None):
    core = types.ModuleType("mlx.core")
    core.__version__ = "0.30.0"
    core.metal = types.SimpleNamespace(is_available=lambda: available, device_info=lambda: dict(info or {}))
    core.device_info = lambda: dict(info or {})
    pkg = types.ModuleType("mlx")
    pkg.core = core
    return pkg, core


@pytest.fixture
def machine(monkeypatch):
    """Install fakes: machine(torch=..., mlx=...) with None meaning 'import fails'."""

    def install(torch=None, mlx=None, ram=16 * GiB, cpu="Apple M2 Pro"):
        monkeypatch.setitem(sys.modules, "torch", torch)  # None in sys.modules makes `import` raise ImportError
        pkg, core = mlx if mlx is not None else (None, None)
        monkeypatch.setitem(sys.modules, "mlx", pkg)
        monkeypatch.setitem(sys.modules, "mlx.core", core)
        monkeypatch.setattr(hwmod, "_system_memory", lambda: (ram, "physical memory"))
        monkeypatch.setattr(hwmod, "_cpu_name", lambda: cpu)
        monkeypatch.setattr(hwmod, "pci_gpus", lambda root=None: [])      # no GPU on the bus unless a test says so
        monkeypatch.setattr(hwmod, "_device_runs", lambda torch: None)   # a listed device runs unless a test says not

    return install


RTX_4090 = {"name": "NVIDIA GeForce RTX 4090", "total_memory": 24 * GiB, "memory_clock_rate": 10_501_000, "memory_bus_width": 384}
RTX_3060 = {"name": "NVIDIA GeForce RTX 3060", "total_memory": 12 * GiB, "memory_clock_rate": 7_501_000, "memory_bus_width": 192}
RX_7900 = {"name": "Radeon RX 7900 XTX", "total_memory": 24 * GiB, "gcnArchName": "gfx1100"}


# ------------------------------------------------------------------------------------ detect


def test_cuda(machine):
    machine(torch=fake_torch(cuda={**RTX_4090, "count": 2}), mlx=None, cpu="AMD Ryzen 9")
    hw = detect()
    assert (hw.backend, hw.device, hw.tier) == ("cuda", "NVIDIA GeForce RTX 4090", "raw-power")
    assert "2 CUDA 12.4 devices" in hw.backend_reason and "device 0" in hw.backend_reason
    assert hw.memory_total_bytes == 24 * GiB
    assert hw.memory_total_bytes - hw.memory_usable_bytes == int(0.05 * 24 * GiB) + 1  # 5% for desktop and driver
    assert hw.memory_bandwidth_bytes_per_s == pytest.approx(1008e9, rel=0.001)  # the 4090's published 1008 GB/s
    assert not hw.unified_memory


def test_budget_cuda(machine):
    machine(torch=fake_torch(cuda=RTX_3060), mlx=None)
    hw = detect()
    assert (hw.backend, hw.tier) == ("cuda", "budget-gpu")
    assert hw.memory_bandwidth_bytes_per_s == pytest.approx(360e9, rel=0.001)


def test_rocm(machine):
    machine(torch=fake_torch(cuda=RX_7900, hip="6.2.4"), mlx=None)
    hw = detect()
    assert (hw.backend, hw.tier) == ("rocm", "raw-power")
    assert "ROCm (HIP 6.2.4)" in hw.backend_reason
    assert hw.memory_bandwidth_bytes_per_s is None  # no clock/bus in these properties: unknown, not guessed


def test_mlx_preferred_on_apple_silicon(machine):
    info = {"device_name": "Apple M4 Pro", "memory_size": 24 * GiB, "max_recommended_working_set_size": 17 * GiB}
    machine(torch=fake_torch(mps=True), mlx=fake_mlx(info=info))
    hw = detect()
    assert (hw.backend, hw.device) == ("mlx", "Apple M4 Pro")
    assert hw.unified_memory and hw.memory_total_bytes == 24 * GiB
    assert hw.memory_usable_bytes == 17 * GiB  # Metal's working set is below total - 25%
    assert "working set" in hw.memory_reason
    assert hw.tier == "sweet-spot"
    assert hw.memory_bandwidth_bytes_per_s == int(273e9)
    assert "no CUDA/ROCm device" in hw.backend_reason  # what was tried first is in the reason


def test_mlx_big_mac_is_a_workhorse_and_memory_limit_demotes_it(machine):
    info = {"device_name": "Apple M2 Ultra", "memory_size": 192 * GiB, "max_recommended_working_set_size": 150 * GiB}
    machine(torch=None, mlx=fake_mlx(info=info))
    hw = detect()
    assert (hw.backend, hw.tier, hw.memory_usable_bytes) == ("mlx", "workhorse", 144 * GiB)
    small = detect(memory_limit_gb=8)
    assert (small.memory_usable_bytes, small.tier) == (8 * GiB, "entry")
    assert "--memory-limit" in small.memory_reason
    assert with_memory_limit(hw, 8) == small


def test_mps_when_mlx_is_missing(machine):
    machine(torch=fake_torch(mps=True), mlx=None, ram=8 * GiB, cpu="Apple M2")
    hw = detect()
    assert (hw.backend, hw.device) == ("mps", "Apple M2")
    assert hw.memory_usable_bytes == 4 * GiB  # an 8 GB Mac keeps 4 GiB for macOS and apps
    assert hw.tier == "entry"
    assert "mlx.core not importable" in hw.backend_reason
    assert hw.memory_bandwidth_bytes_per_s == int(100e9)


def test_mlx_installed_without_metal_falls_to_mps(machine):
    machine(torch=fake_torch(mps=True), mlx=fake_mlx(available=False))
    hw = detect()
    assert hw.backend == "mps" and "Metal not available" in hw.backend_reason


def test_broken_imports_fall_back_to_cpu_with_a_reason(machine):
    machine(torch=None, mlx=None, ram=32 * GiB, cpu="Intel Core i7")
    hw = detect()
    assert (hw.backend, hw.tier, hw.device) == ("cpu", "cpu-only", "Intel Core i7")
    assert "torch not importable" in hw.backend_reason and "mlx.core not importable" in hw.backend_reason
    assert hw.memory_usable_bytes == 24 * GiB and hw.memory_bandwidth_bytes_per_s is None


def test_a_crashing_cuda_probe_falls_back_to_cpu(machine):
    machine(torch=fake_torch(cuda_raises=RuntimeError("CUDA driver version is insufficient\nmore")), mlx=None)
    hw = detect()
    assert hw.backend == "cpu"
    assert "CUDA probe failed (RuntimeError: CUDA driver version is insufficient)" in hw.backend_reason


def test_a_gpu_this_torch_cannot_use_is_named_and_not_viable(machine, monkeypatch, capsys):
    """An RX 580 next to a CPU-only (or unsupporting) torch: one line says so; the peer trains on the CPU."""
    machine(torch=fake_torch(), mlx=None, cpu="AMD Ryzen 5")
    monkeypatch.setattr(hwmod, "pci_gpus", lambda root=None: ["AMD GPU 1002:67df"])
    hw = detect()
    assert hw.backend == "cpu" and hw.tier == "cpu-only"
    assert "AMD GPU 1002:67df" in hw.unusable_gpu and "not viable for training" in hw.unusable_gpu
    assert "CPU-only build" in hw.unusable_gpu and "\n" not in hw.unusable_gpu
    assert main(["--no-probe"]) == 0
    assert "AMD GPU 1002:67df" in capsys.readouterr().out


def test_a_listed_gpu_that_cannot_run_a_kernel_falls_back_before_any_round(machine, monkeypatch):
    rx580 = {"name": "Radeon RX 580 Series", "total_memory": 8 * GiB, "gcnArchName": "gfx803"}
    machine(torch=fake_torch(cuda=rx580, hip="6.2.4"), mlx=None)
    monkeypatch.setattr(hwmod, "_device_runs", lambda torch: "RuntimeError: HIP error: invalid device function")
    hw = detect()
    assert hw.backend == "cpu"
    assert "Radeon RX 580 Series" in hw.unusable_gpu and "invalid device function" in hw.unusable_gpu
    assert detect().unusable_gpu == hw.unusable_gpu


def test_pci_gpus_reads_display_controllers_of_gpu_vendors(tmp_path):
    from swarm.hardware import pci_gpus

    for slot, cls, vendor, device in (("0000:01:00.0", "0x030000", "0x1002", "0x67df"),   # RX 580: VGA
                                      ("0000:01:00.1", "0x040300", "0x1002", "0xaaf0"),   # its HDMI audio
                                      ("0000:00:02.0", "0x030000", "0x8086", "0x3e92"),   # Intel iGPU
                                      ("0000:02:00.0", "0x030200", "0x10de", "0x2504")):  # RTX 3060: 3D controller
        d = tmp_path / slot
        d.mkdir()
        for name, value in (("class", cls), ("vendor", vendor), ("device", device)):
            (d / name).write_text(value + "\n")
    assert pci_gpus(tmp_path) == ["AMD GPU 1002:67df", "NVIDIA GPU 10de:2504"]
    assert pci_gpus(tmp_path / "missing") == []


def test_a_crashing_mlx_probe_falls_back(machine):
    core = types.ModuleType("mlx.core")
    core.metal = types.SimpleNamespace(is_available=lambda: (_ for _ in ()).throw(OSError("no Metal device")))
    machine(torch=fake_torch(), mlx=(types.ModuleType("mlx"), core))
    hw = detect()
    assert hw.backend == "cpu" and "mlx Metal probe failed" in hw.backend_reason


def test_this_machine():
    hw = detect()
    assert hw.backend in BACKENDS and hw.tier in TIERS and hw.backend_reason
    assert 0 < hw.memory_usable_bytes <= hw.memory_total_bytes
    assert json.dumps(hw.as_dict())


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "8", True])
def test_bad_memory_limit(bad):
    with pytest.raises(SwarmError, match="memory limit"):
        detect(memory_limit_gb=bad)


# -------------------------------------------------------------------------------------- tiers


@pytest.mark.parametrize("backend, gib, tier", [
    ("cpu", 512, "cpu-only"),
    ("cuda", 7.6, "budget-gpu"), ("cuda", 11.4, "budget-gpu"), ("cuda", 19.99, "budget-gpu"),
    ("cuda", 20, "raw-power"), ("rocm", 22.8, "raw-power"), ("cuda", 76, "raw-power"),
    ("mlx", 4, "entry"), ("mps", 12, "entry"), ("mlx", 15.99, "entry"),
    ("mlx", 16, "sweet-spot"), ("mps", 24, "sweet-spot"), ("mlx", 39.99, "sweet-spot"),
    ("mlx", 40, "workhorse"), ("mlx", 144, "workhorse"),
])
def test_tier_boundaries(backend, gib, tier):
    assert tier_for(backend, int(gib * GiB)) == tier
    assert tier in TIERS


def test_tier_of_unknown_backend():
    with pytest.raises(SwarmError):
        tier_for("tpu", GiB)


@pytest.mark.parametrize("backend, total_gib, usable_gib", [
    ("mlx", 8, 4), ("mps", 16, 12), ("mlx", 32, 24), ("mlx", 192, 144),   # Apple: max(4 GiB, 25%) kept
    ("cpu", 4, 2), ("cpu", 64, 48),                                        # CPU: max(2 GiB, 25%)
    ("cuda", 8, 7.5), ("cuda", 24, 22.8),                                  # VRAM: max(0.5 GiB, 5%)
])
def test_usable_memory_keeps_headroom(backend, total_gib, usable_gib):
    usable, how = usable_memory(backend, total_gib * GiB)
    assert usable == pytest.approx(usable_gib * GiB, rel=0.001) and "kept for the OS" in how


def test_apple_bandwidth_by_chip():
    assert apple_bandwidth("Apple M2 Ultra") == int(800e9)
    assert apple_bandwidth("Apple M1") == int(68.25e9)
    assert apple_bandwidth("Apple M9 Hyper") is None and apple_bandwidth("Intel Xeon") is None


# ---------------------------------------------------------------------------------------- CLI


def profile(backend="mlx", total=32 * GiB, usable=24 * GiB) -> HardwareProfile:
    return HardwareProfile(backend=backend, backend_reason="fake", device="Apple M2 Pro", memory_total_bytes=total,
                           memory_usable_bytes=usable, memory_reason="fake", memory_bandwidth_bytes_per_s=int(200e9),
                           bandwidth_source="fake", unified_memory=True, tier=tier_for(backend, usable))


@pytest.fixture
def fixed_machine(monkeypatch):
    hw = profile()
    monkeypatch.setattr(hwmod, "detect", lambda memory_limit_gb=None: with_memory_limit(hw, memory_limit_gb))
    return hw


def run_json(capsys, *argv) -> dict:
    assert main(["--json", "--no-probe", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json_fits_table(fixed_machine, capsys):
    out = run_json(capsys)
    for key in ("backend", "backend_reason", "device", "memory_total_bytes", "memory_usable_bytes", "tier", "fits"):
        assert key in out
    assert out["memory_usable_bytes"] == 24 * GiB and out["tier"] == "sweet-spot"
    assert out["throughput_tokens_per_s"] is None and "--no-probe" in out["throughput_note"]
    rows = out["fits"]
    assert len(rows) == 6 * 3
    assert [r["name"] for r in rows[::3]] == ["0.5B", "1B", "3B", "7B", "13B", "30B"]
    for r in rows:
        assert set(r) >= {"params", "method", "fits", "max_micro_batch", "estimate_bytes"}
        assert r["fits"] == (r["max_micro_batch"] > 0) == (r["estimate_bytes"] <= 24 * GiB)
    by = {(r["name"], r["method"]): r for r in rows}
    # the reference's sweet spot: 3B comfortably, 7B with QLoRA; no 13B LoRA, no 7B full fine-tune
    assert by["3B", "lora"]["fits"] and by["7B", "qlora"]["fits"]
    assert not by["13B", "lora"]["fits"] and not by["7B", "full"]["fits"] and not by["30B", "lora"]["fits"]
    for method in ("qlora", "lora", "full"):
        mbs = [r["max_micro_batch"] for r in rows if r["method"] == method]
        assert mbs == sorted(mbs, reverse=True)


def test_cli_memory_limit_shrinks_what_fits(fixed_machine, capsys):
    big, small = run_json(capsys), run_json(capsys, "--memory-limit", "6")
    assert small["memory_usable_bytes"] == 6 * GiB and small["tier"] == "entry"
    assert sum(r["max_micro_batch"] for r in small["fits"]) < sum(r["max_micro_batch"] for r in big["fits"])


def test_cli_seq_len_changes_micro_batches(fixed_machine, capsys):
    short, long = run_json(capsys, "--seq-len", "64"), run_json(capsys, "--seq-len", "1024")
    assert all(s["max_micro_batch"] >= lo["max_micro_batch"] for s, lo in zip(short["fits"], long["fits"]))


def test_cli_params_breakdown(fixed_machine, capsys):
    out = run_json(capsys, "--params", "7B")
    assert out["params"] == 6_738_415_616 and out["name"] == "7B"
    assert set(out["methods"]) == {"qlora", "lora", "full"}
    for m in out["methods"].values():
        parts = ("weights_bytes", "trainable_bytes", "activations_bytes", "overhead_bytes")
        assert m["total_bytes"] == sum(m[p] for p in parts)
    assert out["methods"]["qlora"]["total_bytes"] < out["methods"]["lora"]["total_bytes"] < out["methods"]["full"]["total_bytes"]
    assert out["methods"]["qlora"]["fits"] and not out["methods"]["full"]["fits"]


def test_cli_model_dir_breakdown(fixed_machine, capsys, tmp_path):
    cfg = {"vocab_size": 260, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = run_json(capsys, "--model", str(tmp_path), "--micro-batch", "4", "--seq-len", "256")
    assert out["params"] == 3_297_536 and out["micro_batch"] == 4 and out["seq_len"] == 256
    assert all(m["fits"] for m in out["methods"].values())


def test_cli_human_output(fixed_machine, capsys):
    assert main(["--no-probe"]) == 0
    text = capsys.readouterr().out
    for word in ("mlx", "Apple M2 Pro", "sweet-spot", "200 GB/s", "QLoRA", "full fine-tune", "30B"):
        assert word in text
    assert main(["--no-probe", "--params", "13B"]) == 0
    assert "activations" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--params", "7X"], "bad parameter count"),
    (["--params", "0"], "outside"),
    (["--model", "/nonexistent/model"], "not a model directory"),
    (["--memory-limit", "-1"], "positive number"),
    (["--memory-limit", "lots"], "number of GB"),
    (["--seq-len", "0"], "positive integer"),
    (["--model", "x", "--params", "7B"], "not allowed with"),
    (["--frobnicate"], "unrecognized"),
])
def test_cli_bad_input_is_one_line_and_non_zero(fixed_machine, capsys, argv, match):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    assert code != 0 and match in err
    assert err.count("\n") == 1 and err.startswith("swarm.hardware: error:")


def test_cli_bad_input_end_to_end_has_no_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SWARM_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "swarm.hardware", "--params", "seven"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "bad parameter count" in p.stderr


# ------------------------------------------------------------------------------ throughput


class FakeBackend:
    name = "fake"

    def __init__(self, tokens=1000, seconds=0.5):
        self.calls, self.tokens, self.seconds = 0, tokens, seconds

    def train(self, batches):
        self.calls += 1
        n = sum(int(np.asarray(b)[:, 1:].size) for b in batches)
        return TrainResult(grads={}, tokens=n or self.tokens, loss_sum=0.0, seconds=self.seconds)


def test_measure_throughput_times_only_the_measured_steps():
    b = FakeBackend(seconds=0.25)
    tps = measure_throughput(b, lambda: [np.zeros((2, 65), np.int64)], warmup=2, steps=4)
    assert b.calls == 6
    assert tps == pytest.approx(128 / 0.25)


def test_measure_throughput_rejects_nothing_measured():
    with pytest.raises(SwarmError):
        measure_throughput(FakeBackend(seconds=0.0), lambda: [np.zeros((1, 9), np.int64)])


def test_throughput_cache_survives_a_restart():
    key = ThroughputKey("ab" * 32, "torch", "cpu", "float32", 8, 128)
    calls = []

    def measure():
        calls.append(1)
        return 1234.5

    assert cached_throughput(key, measure) == (1234.5, False)
    assert cached_throughput(key, measure) == (1234.5, True)        # a "restart": read from disk
    assert len(calls) == 1
    other = ThroughputKey("ab" * 32, "torch", "cpu", "float32", 4, 128)  # another micro-batch: measure again
    assert cached_throughput(other, lambda: 999.0) == (999.0, False)
    assert len(load_cache()) == 2
    assert [p.name for p in cache_path().parent.iterdir()] == ["throughput.json"]  # no temp files left


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 99, "entries": {}}',
                                     '{"version": 1, "entries": {"k": {"tokens_per_s": "NaN"}}}'])
def test_a_damaged_cache_is_measured_again(content):
    cache_path().parent.mkdir(parents=True, exist_ok=True)
    cache_path().write_text(content)
    key = ThroughputKey("cd" * 32, "torch", "cpu", "float32", 8, 128)
    assert cached_throughput(key, lambda: 50.0) == (50.0, False)
    assert cached_throughput(key, lambda: 1 / 0) == (50.0, True)


def test_probe_degrades_without_the_torch_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "swarm.backends.torch_lora", None)
    value, note = probe_default_throughput("cpu")
    assert value is None and note.startswith("not measured") and "torch backend" in note


def test_probe_of_the_default_model_is_measured_once():
    pytest.importorskip("peft")
    value, note = probe_default_throughput("cpu", micro_batch=2, seq_len=16, steps=1)
    assert value and value > 0 and note.startswith("measured now"), note
    again, note = probe_default_throughput("cpu", micro_batch=2, seq_len=16, steps=1)
    assert again == value and note.startswith("cached")


def test_cli_precision_rows(fixed_machine, capsys, monkeypatch):
    """A row per precision: the ones this platform runs, with micro-batches; the others with the fix."""
    monkeypatch.setattr(hwmod, "detect", lambda memory_limit_gb=None: with_memory_limit(profile("cpu", usable=24 * GiB), memory_limit_gb))
    rows = {r["precision"]: r for r in run_json(capsys)["precisions"]}
    assert set(rows) == {"fp32", "bf16", "fp16", "nf4"}
    assert rows["fp32"]["runs"] and rows["bf16"]["runs"] and not rows["fp16"]["runs"]
    assert "GPU" in rows["fp16"]["reason"] and rows["fp16"]["max_micro_batch"] == {}
    fp32, bf16 = rows["fp32"]["max_micro_batch"], rows["bf16"]["max_micro_batch"]
    assert list(fp32) == ["0.5B", "1B", "3B", "7B", "13B", "30B"]
    assert all(bf16[n] >= fp32[n] for n in fp32) and bf16["7B"] > fp32["7B"] == 0  # half the base: 7B fits in bf16 only
    assert main(["--no-probe"]) == 0
    text = capsys.readouterr().out
    assert "per base precision" in text and "fp16: not here: fp16 needs a GPU" in text
