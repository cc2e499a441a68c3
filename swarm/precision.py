"""The precision of the frozen base model, chosen per peer.

Why peers may differ: only the LoRA adapter travels and is averaged. Its parameters, their
gradients and the AdamW moments are fp32 on every peer, whatever the base is stored in, and the
averaged gradient every member applies is the same fp32 vector (swarm.averaging). So a peer whose
base is bf16 or 4-bit (QLoRA) computes a slightly different *contribution* -- like any peer with
other data -- but after the round every member applies the same fp32 update to the same fp32
adapter with the same fp32 optimizer state: the adapters stay bit-identical. The precision is
therefore not part of `RunConfig.fingerprint`; a peer picks the most precise option it can run.

Names (the contract of `--precision`):
  fp32  float32 base weights: every platform.
  bf16  bfloat16 base weights: every torch device (CPU included: slower, half the memory).
  fp16  float16 base weights: GPU only (CUDA/ROCm/MPS); CPU float16 matmuls are slow and lossy.
  nf4   4-bit NormalFloat base linears (QLoRA): torch needs bitsandbytes (bnb_4bit_use_double_quant,
        compute in bf16). The mlx backend trains fp32 bases only so far (bf16 and mlx-lm's 4-bit
        `QuantizedLinear` are still to build).

`supported(platform)` returns every name with whether it runs here and why (detected settings
carry their reason), `check(...)` turns a forced precision the peer cannot run into one line
naming the fix.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from swarm import SwarmError

Precision = Literal["fp32", "bf16", "fp16", "nf4"]
#: Most precise first: the order a peer tries them in.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "nf4")
CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)
#: The memory model's dtype name of the compute dtype of each precision (nf4 computes in 16 bits).
DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "nf4": "bfloat16"}
GPU = ("cuda", "rocm", "mps")


@dataclass(frozen=True)
class Support:
    precision: str
    ok: bool
    reason: str  #: why it runs here, or the fix when it does not


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def support(precision: str, platform: str, framework: str = "torch") -> Support:
    """Whether `precision` runs on `platform` (hardware backend: cpu/cuda/rocm/mps/mlx) with `framework`."""
    if precision not in PRECISIONS:
        raise SwarmError(f"unknown precision {precision!r}: choose one of {', '.join(CHOICES)}")
    if framework == "mlx":
        if not _has("mlx"):
            return Support(precision, False, 'mlx is not installed: pip install -e ".[mlx]"')
        if precision != "fp32":  # bf16 and 4-bit QuantizedLinear on mlx: not built yet
            return Support(precision, False, f"the mlx backend trains fp32 bases only so far: use --backend torch for {precision}")
        return Support(precision, True, "mlx float32")
    if precision == "fp32":
        return Support(precision, True, "every platform")
    if precision == "bf16":
        return Support(precision, True, "torch bfloat16" + (" (CPU: half the memory, slower matmuls)" if platform == "cpu" else ""))
    if precision == "fp16":
        if platform in GPU:
            return Support(precision, True, f"torch float16 on {platform}")
        return Support(precision, False, "fp16 needs a GPU (CUDA, ROCm or MPS): use bf16 or fp32 on this machine")
    if not _has("bitsandbytes"):
        return Support(precision, False, 'nf4 needs bitsandbytes: pip install -e ".[qlora]"')
    return Support(precision, True, "bitsandbytes 4-bit NF4" + (" (CPU kernels: slow; CUDA is its target)" if platform == "cpu" else ""))


def supported(platform: str, framework: str = "torch") -> list[Support]:
    """Every precision name with whether it runs on this platform, and why."""
    return [support(p, platform, framework) for p in PRECISIONS]


@dataclass(frozen=True)
class PrecisionSettings:
    """How this peer loads its base model: built once in swarm.join from --precision."""

    precision: str = "fp32"
    reason: str = "default"
    gradient_checkpointing: bool = False
    requested: str = "auto"  #: what --precision asked for (re-resolved against the run's allowed list)
    platform: str = "cpu"
    framework: str = "torch"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SwarmError(f"unknown precision {self.precision!r}: choose one of {', '.join(CHOICES)}")

    @property
    def dtype(self) -> str:
        return DTYPE[self.precision]

    @property
    def method(self) -> str:
        """The memory model's method (swarm.memory.estimate): a 4-bit base is QLoRA."""
        return "qlora" if self.precision == "nf4" else "lora"

    def runnable(self) -> tuple[str, ...]:
        """The precisions this peer's platform can run (advertised)."""
        return tuple(p for p in PRECISIONS if support(p, self.platform, self.framework).ok)

    def for_run(self, allowed: tuple[str, ...]) -> "PrecisionSettings":
        """The same request resolved within a run's `train.precisions` (known once the run is)."""
        return settings(self.requested, self.platform, self.framework, tuple(allowed), self.gradient_checkpointing)


def choose(settings_: PrecisionSettings, allowed: tuple[str, ...], fits) -> PrecisionSettings:
    """With --precision auto: the most precise allowed option this peer runs whose micro-batch 1 fits its memory,
    first without, then with gradient checkpointing (`fits(precision, checkpointing) -> bool`, the memory model).
    A forced precision is kept as is. Pure: the same request, list and memory give the same choice on every peer.
    If nothing fits, the most precise runnable option is returned (the peer then reports that it does not fit)."""
    first = settings_.for_run(allowed)
    if settings_.requested != "auto":
        return first
    runnable = [p for p in PRECISIONS if p in allowed and support(p, settings_.platform, settings_.framework).ok]
    for ckpt in (False, True):
        for p in runnable:
            if fits(p, ckpt):
                why = f"auto: the most precise allowed option that fits ({support(p, settings_.platform, settings_.framework).reason})"
                return PrecisionSettings(p, why + (", with gradient checkpointing" if ckpt else ""), ckpt, "auto",
                                         settings_.platform, settings_.framework)
    return first


def settings(requested: str, platform: str, framework: str = "torch", allowed: tuple[str, ...] = PRECISIONS,
             gradient_checkpointing: bool = False) -> PrecisionSettings:
    """The precision this peer loads: the forced one (SwarmError naming the fix if it cannot run here or the
    run does not allow it), or with 'auto' the most precise allowed one that runs here."""
    if requested == "auto":
        for p in PRECISIONS:
            if p in allowed:
                s = support(p, platform, framework)
                if s.ok:
                    return PrecisionSettings(p, f"auto: most precise allowed option that runs here ({s.reason})",
                                             gradient_checkpointing, requested, platform, framework)
        raise SwarmError(f"no precision the run allows ({', '.join(allowed)}) runs on this {platform} peer")
    s = support(requested, platform, framework)
    if not s.ok:
        raise SwarmError(f"--precision {requested}: {s.reason}")
    if requested not in allowed:
        raise SwarmError(f"--precision {requested}: the run allows only {', '.join(allowed)}")
    return PrecisionSettings(requested, f"--precision {requested} ({s.reason})", gradient_checkpointing, requested,
                             platform, framework)
