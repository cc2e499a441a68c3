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
  nf4   a 4-bit base (QLoRA). torch: bitsandbytes 4-bit NormalFloat linears (bnb_4bit_use_double_quant,
        compute in bf16). mlx: mlx-lm's QLoRA, `nn.QuantizedLinear` 4-bit affine with a scale and bias
        per group of 64 (MLX has no NormalFloat). One name on purpose: a run's `train.precisions` and
        the planner choose a memory tier (a 4-bit base), not a quantization codebook; both store ~4.5
        bits per weight (swarm.memory.QUANT_BYTES_PER_PARAM has each one's exact figure), and either
        one's adapter is the same fp32 adapter. A run that wants no 4-bit peer leaves nf4 out.

The mlx backend runs fp32, bf16 and nf4 (mlx-lm 4-bit); fp16 is torch-on-GPU only.

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
        if precision == "fp16":
            return Support(precision, False, "the mlx backend trains fp32, bf16 and nf4 (4-bit) bases: use one of those, "
                                             "or --backend torch on a GPU for fp16")
        if precision == "nf4" and not _has("mlx_lm"):
            return Support(precision, False, 'nf4 on mlx needs mlx-lm: pip install -e ".[mlx]"')
        return Support(precision, True, {"fp32": "mlx float32", "bf16": "mlx bfloat16",
                                         "nf4": "mlx-lm 4-bit QuantizedLinear, group 64 (MLX's QLoRA)"}[precision])
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

    @property
    def memory_backend(self) -> str:
        """swarm.memory's backend for this peer: 'mlx' with the mlx framework (its runtime, its 4-bit format), else
        the hardware platform."""
        return "mlx" if self.framework == "mlx" else self.platform

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
    If nothing fits, the most compact runnable option with checkpointing is returned: the least this peer needs,
    which it then advertises with max_micro_batch 0 (the planner excludes it naming that need)."""
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
    if runnable:
        return PrecisionSettings(runnable[-1], "auto: no allowed option fits; the most compact one, with gradient checkpointing",
                                 True, "auto", settings_.platform, settings_.framework)
    return first


@dataclass(frozen=True)
class Fit:
    """What this peer trains a run in: its precision settings, the largest micro-batch (0: none fits) and the
    memory micro-batch 1 needs in them (advertised, so the planner can say why a peer is left out)."""

    settings: PrecisionSettings
    max_micro_batch: int
    needed_bytes: int


def fit(settings_: PrecisionSettings, run, shape, usable_bytes: int) -> Fit:
    """`choose` against the memory model (swarm.memory) for `run` (a RunConfig) on a model of `shape`. Pure."""
    from swarm.memory import estimate, max_micro_batch

    def kwargs(p: str, ckpt: bool) -> dict:
        return dict(method="qlora" if p == "nf4" else "lora", lora_r=run.lora.r, lora_targets=run.lora.target_modules,
                    seq_len=run.train.seq_len, grad_checkpointing=ckpt, dtype=DTYPE[p], backend=settings_.memory_backend)

    chosen = choose(settings_, tuple(run.train.precisions), lambda p, ckpt: max_micro_batch(usable_bytes, shape, limit=1, **kwargs(p, ckpt)) >= 1)
    k = kwargs(chosen.precision, chosen.gradient_checkpointing)
    return Fit(chosen, max_micro_batch(usable_bytes, shape, limit=run.train.micro_batch, **k),
               estimate(shape, micro_batch=1, **k).total)


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
