"""The one canonical adapter layout, and the peft files written from it.

Canonical layout (on the wire, in checkpoints, between backends):
  name  = "<module path>.lora_A" | "<module path>.lora_B", module path as in the HF model
          (e.g. "model.layers.0.self_attn.q_proj.lora_A")
  lora_A: (r, in_features);  lora_B: (out_features, r);  dtype float32
  forward: y = W x + (alpha / r) * B (A x)            -- peft's convention
Backends convert at their edge, here, in one place; round trips are exact (transposes only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from swarm import SwarmError
from swarm.config import RunConfig
from swarm.model import tensors_sha256

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def scale(run: RunConfig) -> float:
    return run.lora.alpha / run.lora.r


def module_of(name: str) -> str:
    """'model.layers.0.self_attn.q_proj.lora_A' -> 'model.layers.0.self_attn.q_proj'."""
    return name.rsplit(".", 1)[0]


# --- peft ------------------------------------------------------------------------------------
def to_peft_key(name: str) -> str:
    return f"{PEFT_PREFIX}{name}.weight"


def from_peft_key(key: str) -> str:
    """Accepts saved keys ('...lora_A.weight') and live parameter names ('...lora_A.default.weight')."""
    k = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
    return k.replace(".lora_A.default", ".lora_A").replace(".lora_B.default", ".lora_B")


# --- mlx-lm ----------------------------------------------------------------------------------
# mlx-lm's LoRALinear (mlx_lm/tuner/lora.py) computes y = linear(x) + scale * (x @ lora_a) @ lora_b with
# lora_a (in, r), lora_b (r, out) and scale = alpha / r: the transposes of peft's lora_A / lora_B.
# Its module paths for Llama / Qwen2 / Mistral are HF's ("model.layers.0.self_attn.q_proj"), so only the
# leaf name and the orientation change. Transposes only: round trips are exact.
MLX_ADAPTER_FILE = "adapters.safetensors"
_TO_MLX_LEAF = {"lora_A": "lora_a", "lora_B": "lora_b"}
_FROM_MLX_LEAF = {v: k for k, v in _TO_MLX_LEAF.items()}


def _convert(tensors: dict[str, np.ndarray], leaves: dict[str, str], kind: str) -> dict[str, np.ndarray]:
    out = {}
    for name, a in tensors.items():
        mod, _, leaf = name.rpartition(".")
        if leaf not in leaves or not mod:
            raise SwarmError(f"not a {kind} LoRA tensor name: {name}")
        a = np.asarray(a)
        if a.ndim != 2:
            raise SwarmError(f"LoRA tensor {name} has shape {a.shape}, expected 2 dimensions")
        out[f"{mod}.{leaves[leaf]}"] = np.ascontiguousarray(a.T)
    return out


def to_mlx(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical -> mlx-lm: '<module>.lora_A' (r, in) -> '<module>.lora_a' (in, r); lora_B likewise."""
    return _convert(tensors, _TO_MLX_LEAF, "canonical")


def from_mlx(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mlx-lm -> canonical (the exact inverse of `to_mlx`)."""
    return _convert(tensors, _FROM_MLX_LEAF, "mlx")


_LAYER_PATH = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def mlx_adapter_config(tensors: dict[str, np.ndarray], run: RunConfig) -> dict:
    """adapter_config.json as mlx-lm's `load_adapters` / `linear_to_lora_layers` read it.

    `keys` are module paths relative to a transformer block ("self_attn.q_proj"), or top-level paths for
    modules outside the blocks; `num_layers` counts blocks from the last one, so it spans every adapted block.
    """
    keys: set[str] = set()
    deepest = -1
    for name in tensors:
        m = _LAYER_PATH.match(module_of(name))
        if m:
            deepest = max(deepest, int(m.group(1)))
            keys.add(m.group(2))
        else:
            keys.add(module_of(name))
    return {
        "fine_tune_type": "lora",
        "num_layers": deepest + 1,
        "lora_parameters": {"rank": run.lora.r, "scale": scale(run), "dropout": 0.0, "keys": sorted(keys)},
    }


def save_mlx_adapter(directory: Path, tensors: dict[str, np.ndarray], run: RunConfig) -> None:
    """Write an mlx-lm adapter directory (`mlx_lm.load(model, adapter_path=...)` loads it) atomically."""
    from safetensors.numpy import save

    if not tensors:
        raise SwarmError("refusing to write an empty adapter")
    mlx = to_mlx({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})
    payload = save(dict(sorted(mlx.items())), metadata={"format": "mlx"})
    write_dir_atomically(Path(directory), {
        MLX_ADAPTER_FILE: payload,
        ADAPTER_CONFIG: json.dumps(mlx_adapter_config(tensors, run), indent=2).encode(),
    })


def load_mlx_adapter(directory: Path) -> dict[str, np.ndarray]:
    """Read an mlx-lm adapter directory back into canonical layout."""
    from safetensors.numpy import load_file

    f = readable_dir(Path(directory)) / MLX_ADAPTER_FILE
    if not f.is_file():
        raise SwarmError(f"no mlx adapter at {f}")
    return from_mlx(load_file(str(f)))


def adapter_sha256(tensors: dict[str, np.ndarray]) -> str:
    """The hash every peer computes the same way: canonical names, fp32 bytes."""
    return tensors_sha256({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})


def peft_targets(run: RunConfig) -> list[str] | str:
    """peft's target_modules for the run: its list, or 'all-linear' (every attention and MLP linear) when unset."""
    return "all-linear" if run.lora.target_modules is None else sorted(run.lora.target_modules)


def fan_in_fan_out(base_model_dir: Path) -> bool:
    """True for GPT-2-style models whose linears are transformers' Conv1D (weight stored (in, out)).

    Only the base weight is transposed; lora_A (r, in) and lora_B (out, r) keep the canonical layout."""
    try:
        cfg = json.loads((Path(base_model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") in ("gpt2",)


def peft_config(run: RunConfig, base_model_dir: Path, tensors: dict[str, np.ndarray] | None = None) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_dir),
        "r": run.lora.r,
        "lora_alpha": run.lora.alpha,
        "lora_dropout": 0.0,
        # the layers the adapter really has (an explicit list loads in any peft/tool), else the run's rule
        "target_modules": sorted({module_of(k).rsplit(".", 1)[-1] for k in tensors}) if tensors else peft_targets(run),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out(base_model_dir),
        "inference_mode": True,
        "use_rslora": False,
        "init_lora_weights": True,
    }


def write_dir_atomically(target: Path, files: dict[str, bytes]) -> None:
    """Write files into a fresh sibling directory, then swap it in: readers see old or new, never half.

    The swap is two renames (target -> .target.old, fresh -> target); a kill between them leaves only
    .target.old, which `recover_dir` (called here first) puts back. Readers never rename anything
    (`readable_dir` reads .target.old in that moment), so a reader beside a live writer cannot undo its
    first rename; if a stray process did, the writer sets the reappeared directory aside again."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a kill mid-write (one writer per --output)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        old = target.parent / f".{target.name}.old"
        if old.exists():
            shutil.rmtree(old)
        for _ in range(3):  # bounded: another process may have put an old version back meanwhile
            if target.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.rename(target, old)
            try:
                os.rename(tmp, target)
                break
            except OSError:
                if not target.exists():
                    raise
        else:
            raise OSError(f"could not replace {target}: another process keeps putting it back")
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Finish a swap that a kill interrupted: `target` missing but its previous version set aside -> put it back."""
    target = Path(target)
    old = target.parent / f".{target.name}.old"
    if not target.exists() and old.is_dir():
        os.rename(old, target)
        _fsync_dir(target.parent)


def readable_dir(target: Path) -> Path:
    """Where a reader finds `target`'s files, without renaming anything (a writer may be between its renames)."""
    target = Path(target)
    old = target.parent / f".{target.name}.old"
    return old if not target.exists() and old.is_dir() else target


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every file system syncs directories
        pass
    finally:
        os.close(fd)


def save_peft_adapter(directory: Path, tensors: dict[str, np.ndarray], run: RunConfig, base_model_dir: Path) -> None:
    """Write a peft adapter directory (loads with PeftModel.from_pretrained) atomically."""
    from safetensors.numpy import save

    payload = save({to_peft_key(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(tensors.items())},
                   metadata={"format": "pt"})
    write_dir_atomically(Path(directory), {
        ADAPTER_FILE: payload,
        ADAPTER_CONFIG: json.dumps(peft_config(run, base_model_dir, tensors), indent=2).encode(),
    })


def load_peft_adapter(directory: Path) -> dict[str, np.ndarray]:
    """Read a peft adapter directory back into canonical layout."""
    from safetensors.numpy import load_file

    f = readable_dir(Path(directory)) / ADAPTER_FILE
    if not f.is_file():
        raise SwarmError(f"no adapter at {f}")
    return {from_peft_key(k): v for k, v in load_file(str(f)).items()}


def initial_adapter(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """The round-0 adapter, identical on every peer and backend: lora_A ~ U(±1/sqrt(in)), lora_B = 0.

    (peft's default draws lora_A from the framework RNG, which differs between machines.)
    """
    rng = np.random.Generator(np.random.PCG64([seed, 0x10CA]))
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".lora_A"):
            bound = 1.0 / np.sqrt(shape[1])
            out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, dtype=np.float32)
    return out
