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


# --- mlx-lm (LoRALinear keeps lora_a as (in, r), lora_b as (r, out), and its own `scale`) -------
def to_mlx(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, a in tensors.items():
        mod, which = name.rsplit(".", 1)
        out[f"{mod}.{which.lower()}"] = np.ascontiguousarray(a.T)
    return out


def from_mlx(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, a in tensors.items():
        mod, which = name.rsplit(".", 1)
        if which not in ("lora_a", "lora_b"):
            raise SwarmError(f"not an mlx LoRA tensor name: {name}")
        out[f"{mod}.{which[:-1]}{which[-1].upper()}"] = np.ascontiguousarray(a.T)
    return out


def adapter_sha256(tensors: dict[str, np.ndarray]) -> str:
    """The hash every peer computes the same way: canonical names, fp32 bytes."""
    return tensors_sha256({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})


def peft_config(run: RunConfig, base_model_dir: Path) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_dir),
        "r": run.lora.r,
        "lora_alpha": run.lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(run.lora.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "init_lora_weights": True,
    }


def write_dir_atomically(target: Path, files: dict[str, bytes]) -> None:
    """Write files into a fresh sibling directory, then swap it in: readers see old or new, never half."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
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
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_peft_adapter(directory: Path, tensors: dict[str, np.ndarray], run: RunConfig, base_model_dir: Path) -> None:
    """Write a peft adapter directory (loads with PeftModel.from_pretrained) atomically."""
    from safetensors.numpy import save

    payload = save({to_peft_key(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(tensors.items())},
                   metadata={"format": "pt"})
    write_dir_atomically(Path(directory), {
        ADAPTER_FILE: payload,
        ADAPTER_CONFIG: json.dumps(peft_config(run, base_model_dir), indent=2).encode(),
    })


def load_peft_adapter(directory: Path) -> dict[str, np.ndarray]:
    """Read a peft adapter directory back into canonical layout."""
    from safetensors.numpy import load_file

    f = Path(directory) / ADAPTER_FILE
    if not f.is_file():
        raise SwarmError(f"no adapter at {f}")
    return {from_peft_key(k): v for k, v in load_file(str(f)).items()}
