"""Measured, not looked up: LoRA-step throughput (cached) and the peak memory of a real step.

- `measure_throughput(backend, make_batches)`: tokens/s of a short probe through the Backend
  interface (`backend.train(batches)` -> TrainResult with tokens and seconds).
- `cached_throughput(key, measure)`: the figure is kept in `cache_root()/throughput.json`, keyed by
  (base model hash, backend, device, dtype, micro-batch, seq len), written atomically, so a restart
  does not measure again.
- `probe_default_throughput(hw_backend)`: what `python -m swarm.hardware` shows: the probe on the
  embedded default model with this machine's backend (mlx on MLX machines, torch elsewhere);
  degrades to (None, reason) if it cannot run.
- `measure_step_peak(...)`: peak resident memory of real LoRA training steps (torch + peft, CPU,
  fp32) of a Llama-style model built from a config, in a fresh subprocess so the peak is clean.
  The memory model's CPU calibration and its measured test use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from swarm import SwarmError
from swarm.model import cache_root

CACHE_FILE = "throughput.json"
CACHE_VERSION = 1


# ----------------------------------------------------------------------------------- throughput


def measure_throughput(backend, make_batches: Callable[[], Iterable[np.ndarray]], warmup: int = 1, steps: int = 3) -> float:
    """Tokens per second of `steps` calls of `backend.train(make_batches())`, after `warmup` calls.

    Counts only what the backend reports (TrainResult.tokens and .seconds): data preparation is
    not timed. SwarmError if the probe trained no tokens or took no time.
    """
    if steps < 1:
        raise SwarmError("throughput probe needs at least one step")
    for _ in range(max(0, warmup)):
        backend.train(make_batches())
    tokens, seconds = 0, 0.0
    for _ in range(steps):
        res = backend.train(make_batches())
        tokens += int(res.tokens)
        seconds += float(res.seconds)
    if tokens <= 0 or not seconds > 0:
        raise SwarmError(f"throughput probe measured {tokens} tokens in {seconds:.3g} s")
    return tokens / seconds


@dataclass(frozen=True)
class ThroughputKey:
    """What a throughput figure depends on; a change in any field means measuring again."""

    model_hash: str   # base weights' sha256 (swarm.model.base_sha256)
    backend: str      # backend name ("torch", "mlx")
    device: str       # where it ran: the swarm.hardware backend ("cpu", "cuda", "rocm", "mps", "mlx")
    dtype: str
    micro_batch: int
    seq_len: int

    def as_str(self) -> str:
        return f"{self.model_hash[:16]}|{self.backend}|{self.device}|{self.dtype}|mb{self.micro_batch}|s{self.seq_len}"


def cache_path() -> Path:
    return cache_root() / CACHE_FILE


def load_cache(path: Path | None = None) -> dict[str, dict]:
    """The cached figures; an unreadable or foreign file counts as empty (it is only a cache)."""
    p = path or cache_path()
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("version") != CACHE_VERSION or not isinstance(raw.get("entries"), dict):
        return {}
    return {k: v for k, v in raw["entries"].items() if _valid_entry(v)}


def _valid_entry(v) -> bool:
    t = v.get("tokens_per_s") if isinstance(v, dict) else None
    return isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1e12


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def store(key: ThroughputKey, tokens_per_s: float, path: Path | None = None) -> None:
    """Add one figure to the cache (read, update, atomic replace; a lost race only costs a re-measure)."""
    p = path or cache_path()
    entries = load_cache(p)
    entries[key.as_str()] = {"tokens_per_s": float(tokens_per_s), "measured_at": time.time(), **asdict(key)}
    _write_atomic(p, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True))


def cached_throughput(key: ThroughputKey, measure: Callable[[], float], path: Path | None = None) -> tuple[float, bool]:
    """(tokens/s, from_cache): the cached figure for `key`, or `measure()` stored for next time."""
    hit = load_cache(path).get(key.as_str())
    if hit is not None:
        return float(hit["tokens_per_s"]), True
    value = float(measure())
    store(key, value, path)
    return value, False


#: swarm.hardware backend -> (swarm backend name, torch device argument). The cache key's device
#: is the hardware backend ("rocm", not torch's "cuda"), as swarm.peer writes it.
_PROBE_BACKEND = {"cuda": ("torch", "cuda"), "rocm": ("torch", "cuda"), "mps": ("torch", "mps"),
                  "cpu": ("torch", "cpu"), "mlx": ("mlx", None)}


def probe_default_throughput(hw_backend: str, micro_batch: int | None = None, seq_len: int | None = None,
                             steps: int = 3) -> tuple[float | None, str]:
    """LoRA-step throughput of the embedded default model on this machine, cached.

    Returns (tokens/s, note) or (None, why it was not measured). Never raises: the throughput
    figure is informative, and a missing or broken backend must not stop hardware detection.
    """
    try:
        from swarm.config import default_run
        from swarm.model import base_sha256, resolve_model_dir

        run = default_run()
        mb = micro_batch or run.train.micro_batch
        sl = seq_len or run.train.seq_len
        name, device = _PROBE_BACKEND.get(hw_backend, ("torch", "cpu"))
        label = hw_backend if hw_backend in _PROBE_BACKEND else "cpu"
        try:
            if name == "mlx":
                from swarm.backends.mlx_lora import MlxLoraBackend as backend_cls
                extra = {}
            else:
                from swarm.backends.torch_lora import TorchLoraBackend as backend_cls
                extra = {"device": device}
        except ImportError as e:
            return None, f"not measured: {name} backend unavailable ({e})"
        model_dir = resolve_model_dir(run.model)
        key = ThroughputKey(base_sha256(model_dir), name, label, "float32", mb, sl)
        vocab = run.model.builtin.vocab_size

        def measure() -> float:
            backend = backend_cls(run, model_dir, **extra)
            rng = np.random.default_rng(0)
            return measure_throughput(backend, lambda: [rng.integers(0, vocab, (mb, sl + 1), dtype=np.int64)], steps=steps)

        value, hit = cached_throughput(key, measure)
        where = "cached" if hit else "measured now"
        note = f"{where}: default model, {name} backend on {label}, micro-batch {mb} x {sl} tokens"
        return value, note
    except Exception as e:  # noqa: BLE001 - informative figure; report why instead of failing detection
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, f"not measured: {msg}"


# --------------------------------------------------------------------------------- peak memory


def _rss_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _peak_child(spec: dict) -> dict:
    """Runs in a fresh interpreter: build the model from config, train `steps` LoRA steps, report RSS.

    The step mirrors swarm's torch backend: fp32, peft LoRA (dropout 0), summed cross-entropy over
    fp32 logits, backward, AdamW step on the adapter only.
    """
    import resource

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    allocator = "allocator left as is"
    if spec.get("tune_allocator"):
        from swarm.hardware import tune_allocator

        allocator = tune_allocator()
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    torch.manual_seed(0)
    # warm the kernels on a toy tensor so "runtime" includes what torch maps on first use
    a = torch.randn(64, 64, requires_grad=True)
    (a @ a).sum().backward()
    del a
    runtime = _rss_status()["VmRSS"]

    cfg = LlamaConfig(**spec["config"], use_cache=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.0,
                                             target_modules=list(spec["targets"]), bias="none"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    built = _rss_status()["VmRSS"]
    gen = torch.Generator().manual_seed(0)
    mb, sl, vocab = spec["micro_batch"], spec["seq_len"], cfg.vocab_size
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        ids = torch.randint(0, vocab, (mb, sl + 1), generator=gen)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), ids[:, 1:].reshape(-1), reduction="sum")
        del logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    st = _rss_status()
    return {
        # VmHWM, this process's own high-water mark: Linux carries ru_maxrss across execve from the forked
        # parent, so ru_maxrss of a child started by a big parent reads at least the parent's size
        "peak_rss_bytes": st["VmHWM"], "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "runtime_rss_bytes": runtime, "built_rss_bytes": built,
        "params": sum(p.numel() for p in model.parameters()), "seconds": seconds, "allocator": allocator,
    }


#: The Llama-style models the CPU memory model is checked against (swarm.memory.OVERHEAD["cpu"],
#: tests/test_memory_measured.py, scripts/memory_table.py): name -> (LlamaConfig keys, micro-batch,
#: seq len). Micro-batch and sequence length vary so that the activation term is tested too.
CALIBRATION_MODELS: dict[str, tuple[dict, int, int]] = {
    "10M": (dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024), 8, 128),
    "50M": (dict(vocab_size=16000, hidden_size=512, intermediate_size=1376, num_hidden_layers=10,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024), 2, 512),
    "150M": (dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024), 2, 256),
}


def measure_step_peak(config: dict, micro_batch: int, seq_len: int, lora_r: int = 8,
                      targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      steps: int = 2, threads: int | None = None, timeout: float = 600, tune_allocator: bool = True) -> dict:
    """Peak resident memory of `steps` real LoRA training steps, measured in a fresh subprocess.

    `config` holds LlamaConfig keys (vocab_size, hidden_size, ...). Linux only (reads /proc).
    `tune_allocator`: call `swarm.hardware.tune_allocator()` first, as swarm's CPU training does.
    Returns the child's report: peak_rss_bytes (VmHWM: the whole process's own peak), runtime_rss_bytes
    (after importing torch, transformers and peft), built_rss_bytes, params, seconds.
    """
    spec = {"config": dict(config), "micro_batch": micro_batch, "seq_len": seq_len, "lora_r": lora_r,
            "targets": list(targets), "steps": steps, "threads": threads, "tune_allocator": tune_allocator}
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "swarm.benchmark", "--peak-child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SwarmError(f"peak-memory probe failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-child":
        print(json.dumps(_peak_child(json.loads(sys.argv[2]))))
    else:
        print("usage: python -m swarm.benchmark --peak-child SPEC_JSON (internal: used by measure_step_peak)", file=sys.stderr)
        sys.exit(2)
