"""The memory model: what a training step costs, as a pure function of shapes and settings.

`estimate(shape, method, ...)` predicts the peak memory of one training step (forward + backward +
optimizer) of a Llama/Qwen2-style decoder, split into parts:

- **weights**: the frozen base (LoRA: in the compute dtype; QLoRA: 4-bit plus quantization
  constants; full fine-tune: the working copy in the compute dtype).
- **trainable**: what is trained, with its gradient and optimizer state. LoRA/QLoRA: the adapter in
  fp32 (peft keeps adapters in fp32) with fp32 gradient and two fp32 Adam moments = 16 bytes per
  adapter parameter. Full fine-tune: see below.
- **activations**: the tensors autograd saves for backward, plus the largest transient buffer of
  the backward pass (the loss head's log-probabilities and their gradients, or one layer's
  backward working set, whichever is larger). Counted tensor by tensor from the HF Llama forward
  (see `_layer_activation_bytes`); not a rule of thumb.
- **overhead**: the framework: a fixed runtime cost per backend plus allocator slack (fraction of
  the rest). Both live in `OVERHEAD`, the one place they are set.

**Full fine-tune follows the 16-bytes-per-parameter rule** for Adam in mixed precision (ZeRO,
Rajbhandari et al. 2020, §2): fp16/bf16 weights 2 + fp32 master weights 4 + two fp32 Adam moments 8
+ fp16/bf16 gradients 2. In fp32 training it is also 16 (weights 4 + gradients 4 + moments 8).
The reference table's full-fine-tune column is not consistent with this (0.5B and 1B follow 16 B/param,
7B, 13B and 30B follow 8 B/param, 3B neither): we follow the rule because it is what AdamW in
torch actually allocates; 8 B/param needs 8-bit optimizers or no master copy, which this
project does not use.

**QLoRA** stores the linear layers of the transformer blocks in 4 bits (NF4, bitsandbytes) with
one fp32 absmax per 64 weights, itself quantized to 8 bits with an fp32 constant per 256 blocks
("double quantization", QLoRA paper §3): 0.5 + 1/64 + 4/16384 bytes per parameter. MLX stores an
fp16 scale and bias per group of 64: 0.5 + 4/64. Embeddings, lm_head and norms stay in 16 bits
(bitsandbytes does not quantize them). Every linear is dequantized on the fly: one dequantized
weight (the largest) is a transient buffer.

Assumptions (documented here, true of swarm's torch backend): LoRA dropout 0 (no saved masks),
fused attention (SDPA flash / memory-efficient kernels: O(seq) memory, no seq x seq matrix),
no KV cache, the loss is cross-entropy over the full vocabulary in fp32. Loading the base costs no more
than training it: both backends read, convert and quantize the checkpoint one tensor at a time (torch:
pread, not mmap, so a converting load does not keep the whole file resident, `swarm.backends.torch_lora.
_from_pretrained`; mlx: lazy arrays evaluated once cast), so the load peak is the trained weights plus
one tensor, below the step's peak, and not modelled separately.

Everything is in bytes. Every function here is pure: no I/O except `ModelShape.from_dir`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Literal

from swarm import SwarmError

GiB = 1 << 30
MiB = 1 << 20

Method = Literal["qlora", "lora", "full"]
METHODS: tuple[str, ...] = ("qlora", "lora", "full")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Bytes per parameter of a 4-bit quantized linear weight, including its quantization constants.
QUANT_BYTES_PER_PARAM = {
    "bnb-nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256),  # 4-bit + 8-bit absmax per 64 + fp32 per 256 blocks
    "mlx-4bit-g64": 0.5 + 4 / 64,                # 4-bit + fp16 scale and bias per group of 64
}

#: Framework overhead per backend: (fixed bytes, fraction of weights + trainable + activations).
#: cpu: calibrated on a 2-core x86 Linux box (torch 2.13, transformers 5, peft 0.21) against the
#:   measured peak RSS of real LoRA steps at ~10M, ~50M and ~150M parameters
#:   (swarm.benchmark.CALIBRATION_MODELS, tests/test_memory_measured.py). The fixed part is the
#:   resident memory of a Python process that has imported torch, transformers and peft and run
#:   one small backward (408-410 MB measured), plus ~22 MB that the first real step adds
#:   (autograd engine, thread pools, kernel caches): the constant part of the residual, the same
#:   at all three sizes. The fraction is heap slack for the small tensors. This assumes glibc's
#:   mmap threshold is pinned (`swarm.hardware.tune_allocator()`); with glibc's default dynamic
#:   threshold the peak RSS is 1.3-1.7x this estimate and varies from run to run (measured).
#: cuda/rocm: the CUDA/HIP context and kernels (300-600 MB depending on GPU and driver), cuBLAS
#:   workspaces, and the caching allocator's fragmentation.
#: mps: the Metal runtime is lighter. mlx: calibrated with scripts/bench_precision.py on mlx[cpu] (2-core
#:   x86 Linux, mlx 0.32, mlx-lm 0.32) at 3M and 22M parameters, fp32/bf16/4-bit: peak RSS minus the parts
#:   was a constant ~100 MiB above the former 256 MiB guess (measured/predicted 1.17-1.43 before, 0.97-1.05
#:   after), i.e. the runtime plus torch, which every peer process imports through hivemind; MLX's buffer
#:   cache is the slack. Not yet measured on Apple Silicon (unified memory, Metal).
OVERHEAD: dict[str, tuple[int, float]] = {
    "cpu": (430 * MiB, 0.02),
    "cuda": (512 * MiB, 0.08),
    "rocm": (512 * MiB, 0.08),
    "mps": (384 * MiB, 0.08),
    "mlx": (360 * MiB, 0.05),
}


def default_dtype(backend: str) -> str:
    """The compute dtype a backend trains in: fp32 on CPU (no fast 16-bit matmul there), bf16 on accelerators."""
    return "float32" if backend == "cpu" else "bfloat16"


# --------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama/Qwen2-style decoder: all the memory model needs to know about a model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    name: str | None = None  # "7B" for a named size, the directory name for a model dir

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SwarmError(f"model shape: {f} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise SwarmError("model shape: num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one block, by its module name."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def block_linear_params(self) -> int:
        """Parameters in the linear layers of all blocks (what QLoRA quantizes)."""
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    def embedding_params(self) -> int:
        """Input embedding plus lm_head (once if tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    def param_count(self) -> int:
        return self.block_linear_params() + self.embedding_params() + self.norm_params()

    @classmethod
    def from_config(cls, cfg: dict, name: str | None = None) -> "ModelShape":
        """From a Hugging Face config.json dict (Llama, Mistral, Qwen2, Gemma, Phi-3 and alike; GPT-2's n_* keys)."""
        if not isinstance(cfg, dict):
            raise SwarmError("model config must be a JSON object")
        if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the decoder here
            cfg = {**cfg, **cfg["text_config"]}
        if "n_embd" in cfg and "hidden_size" not in cfg:  # GPT-2's keys; its MLP is n_inner (default 4 * n_embd)
            n_embd = cfg["n_embd"]
            cfg = {**cfg, "hidden_size": n_embd, "num_attention_heads": cfg.get("n_head"),
                   "num_hidden_layers": cfg.get("n_layer"),
                   "intermediate_size": cfg.get("n_inner") or (4 * n_embd if isinstance(n_embd, int) else None),
                   "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
            cfg = {k: v for k, v in cfg.items() if v is not None}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in cfg]
        if missing:
            raise SwarmError(f"model config lacks {', '.join(missing)} (Llama/Qwen2/Mistral/Gemma/Phi-3/GPT-2-style decoders are understood)")
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else 0)
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), name=name,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelShape":
        """From a local model directory's config.json."""
        d = Path(path).expanduser()
        f = d / "config.json"
        if not f.is_file():
            raise SwarmError(f"model path {d} is not a model directory (no config.json there)")
        try:
            cfg = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SwarmError(f"{f} is not readable JSON: {e}") from None
        return cls.from_config(cfg, name=d.name)


#: Realistic shapes for the sizes people ask about: real published architectures.
NAMED_SHAPES: dict[str, ModelShape] = {
    # Qwen2.5-0.5B: 494M params, GQA 14/2, tied embeddings, 152k vocabulary
    "0.5B": ModelShape(151936, 896, 4864, 24, 14, 2, 64, True, "0.5B"),
    # Qwen2.5-1.5B
    "1.5B": ModelShape(151936, 1536, 8960, 28, 12, 2, 128, True, "1.5B"),
    # Llama-3.2-1B: 1.24B params, GQA 32/8, tied, 128k vocabulary
    "1B": ModelShape(128256, 2048, 8192, 16, 32, 8, 64, True, "1B"),
    # Llama-3.2-3B: 3.21B params
    "3B": ModelShape(128256, 3072, 8192, 28, 24, 8, 128, True, "3B"),
    # Llama-2-7B: 6.74B params, multi-head attention, 32k vocabulary
    "7B": ModelShape(32000, 4096, 11008, 32, 32, 32, 128, False, "7B"),
    # Llama-3.1-8B
    "8B": ModelShape(128256, 4096, 14336, 32, 32, 8, 128, False, "8B"),
    # Llama-2-13B: 13.0B params
    "13B": ModelShape(32000, 5120, 13824, 40, 40, 40, 128, False, "13B"),
    # LLaMA-30B (published as 30B, 32.5B params)
    "30B": ModelShape(32000, 6656, 17920, 60, 52, 52, 128, False, "30B"),
    # Llama-2-70B: 69B params, GQA 64/8
    "70B": ModelShape(32000, 8192, 28672, 80, 64, 8, 128, False, "70B"),
}

#: The sizes of the "what fits" table.
TABLE_SIZES: tuple[str, ...] = ("0.5B", "1B", "3B", "7B", "13B", "30B")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([kmbt]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_params(text: str) -> float:
    """'7B' -> 7e9, '350M' -> 3.5e8, '1.5b', '7e9'. SwarmError on anything else."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise SwarmError(f"bad parameter count {text!r}: expected a size like 7B, 0.5B or 350M")
    n = float(m.group(1)) * (10 ** int(m.group(2) or 0)) * _SUFFIX[m.group(3).lower()]
    if not (1e5 <= n <= 1e12):
        raise SwarmError(f"parameter count {text!r} is outside 100K..1T")
    return n


def _size_label(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:g}B"
    return f"{n / 1e6:g}M"


def _synthetic_chain() -> list[ModelShape]:
    """Llama-2-like shapes of growing size: width and depth grow in turn (width ~128 x depth),
    head_dim 128, MLP 8/3 x width, vocabulary 32 x width up to 32k. Every dimension is
    non-decreasing along the chain, so so is every estimate."""
    chain, h, layers = [], 128, 1
    while h <= 32768:
        inter = 256 * math.ceil(8 * h / 3 / 256)
        heads = h // 128
        chain.append(ModelShape(min(32000, 32 * h), h, inter, layers, heads, heads, 128, False))
        if h // 128 > layers:
            layers += 1
        else:
            h += 128
    return chain


_CHAIN: list[ModelShape] = []


def shape_for_params(text: str) -> ModelShape:
    """A realistic shape for a size: a published architecture for the named sizes (`NAMED_SHAPES`),
    else the Llama-2-like shape of `_synthetic_chain` nearest to it in log scale (so a larger size
    never gives a smaller shape)."""
    n = parse_params(text)
    label = _size_label(n)
    if label in NAMED_SHAPES:
        return NAMED_SHAPES[label]
    if not _CHAIN:
        _CHAIN.extend(_synthetic_chain())
    best = min(_CHAIN, key=lambda s: abs(math.log(s.param_count() / n)))
    return replace(best, name=label)


# ------------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class Estimate:
    """Predicted peak memory of one training step, in bytes, by part."""

    method: str
    dtype: str
    backend: str
    micro_batch: int
    seq_len: int
    grad_checkpointing: bool
    params: int             # base model parameters
    trainable_params: int   # adapter parameters (LoRA/QLoRA) or all parameters (full)
    weights: int            # the base weights as stored for training
    trainable: int          # trainable parameters + their gradients + optimizer state (+ fp32 master copy)
    activations: int        # saved for backward + largest backward transient
    overhead: int           # framework runtime + allocator slack
    total: int

    def parts(self) -> dict[str, int]:
        """The JSON breakdown: `*_bytes` keys plus the parameter counts."""
        return {
            "total_bytes": self.total,
            "weights_bytes": self.weights,
            "trainable_bytes": self.trainable,
            "activations_bytes": self.activations,
            "overhead_bytes": self.overhead,
            "trainable_params": self.trainable_params,
        }

    def as_dict(self) -> dict:
        return asdict(self)


#: Other families' fused or renamed linears -> the Llama-style linears they stand for (GPT-2's c_proj is
#: both the attention output and the MLP down projection; Phi-3 fuses q/k/v and gate/up).
TARGET_ALIASES = {
    "c_attn": ("q_proj", "k_proj", "v_proj"), "c_proj": ("o_proj", "down_proj"), "c_fc": ("up_proj",),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
}


def normalize_targets(targets: Iterable[str] | None) -> tuple[str, ...]:
    """LoRA target names -> the known block linears they select ('all-linear' or None = all seven)."""
    if targets is None:
        return ALL_TARGETS
    out: list[str] = []
    for t in targets:
        if t == "all-linear":
            out.extend(ALL_TARGETS)
            continue
        base = str(t).rsplit(".", 1)[-1]
        if base in TARGET_ALIASES:
            out.extend(TARGET_ALIASES[base])
            continue
        if base not in ALL_TARGETS:
            raise SwarmError(f"unknown LoRA target {t!r} (the memory model knows {', '.join(ALL_TARGETS)})")
        out.append(base)
    if not out:
        raise SwarmError("no LoRA targets given")
    return tuple(sorted(set(out), key=ALL_TARGETS.index))


def lora_params(shape: ModelShape, r: int, targets: Iterable[str]) -> int:
    """Adapter parameters: r x (in + out) per targeted linear per block."""
    lin = shape.linear_shapes()
    return shape.num_layers * sum(r * (lin[t][0] + lin[t][1]) for t in normalize_targets(targets))


def _layer_activation_bytes(shape: ModelShape, method: str, tokens: int, batch: int, e: int, r: int, targets: tuple[str, ...]) -> int:
    """Bytes autograd saves for backward in one decoder block (HF Llama forward, counted tensor by tensor).

    - each RMSNorm upcasts its input to fp32 and saves it (4 B);
    - attention saves the rotated q and k, v, its output and log-sum-exp (fp32 per head and token);
      fused SDPA kernels write the output token-major, so the transpose + .contiguous() before
      o_proj copies nothing;
    - the SwiGLU MLP saves gate (for SiLU), SiLU(gate) and up (for their product): 3 x intermediate;
    - each LoRA target saves A's output (r) as B's input, in fp32 (the adapter's dtype);
    - each LoRA target's A saves its input. Under an fp32 base that is the tensor itself, shared by
      the targets that read it: the two normed outputs, the attention output (already counted) and
      the MLP product (down_proj's input). Under a 16-bit or 4-bit base, each target first casts its
      input to fp32, the adapter's dtype (peft's `_cast_input_dtype`; MLX promotes bf16 @ fp32 the
      same way), and saves that copy: one fp32 copy per target, q, k and v each their own, and the
      16-bit originals are then saved by nobody. At 131M params (torch bf16 and nf4 on CPU) these
      copies were the ~200 MB the model used to miss;
    - full fine-tune: the base linears save their inputs in the compute dtype, and with trainable
      norm weights the un-scaled normed tensor is saved too.
    Frozen base linears save nothing but their weight, which is already counted.
    """
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    per_token = 2 * h * 4                            # two norms' fp32 inputs
    per_token += e * (q + 2 * kv)                    # rotated q, k and v, saved by SDPA
    per_token += e * q                               # SDPA output (o_proj's input)
    per_token += e * 3 * i                           # gate, SiLU(gate), up
    if method == "full":
        per_token += 2 * h * e + 2 * h * e + e * i   # normed outputs, un-scaled normed, MLP product
    else:
        per_token += 4 * r * len(targets)            # LoRA A outputs (fp32)
        if e == 4:                                   # the inputs themselves, saved once (all-linear exact)
            per_token += 2 * h * 4 + 4 * i
        else:                                        # one fp32 cast of its input per target
            per_token += 4 * sum(shape.linear_shapes()[t][0] for t in targets)
    lse = batch * shape.num_heads * (tokens // batch) * 4
    return tokens * per_token + lse


def estimate(
    shape: ModelShape,
    method: str = "lora",
    lora_r: int = 8,
    lora_targets: Iterable[str] = ALL_TARGETS,
    micro_batch: int = 1,
    seq_len: int = 128,
    grad_checkpointing: bool = False,
    dtype: str = "bfloat16",
    backend: str = "cuda",
) -> Estimate:
    """Predicted peak memory of one training step (forward, backward, optimizer step).

    Pure: the same arguments give the same bytes on every peer. Non-decreasing in every size
    argument (model dimensions, rank, targets, micro-batch, sequence length, dtype width).
    """
    if method not in METHODS:
        raise SwarmError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise SwarmError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    if backend not in OVERHEAD:
        raise SwarmError(f"unknown backend {backend!r}: choose one of {', '.join(OVERHEAD)}")
    for name, v in (("lora_r", lora_r), ("micro_batch", micro_batch), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SwarmError(f"{name} must be a positive integer, got {v!r}")
    e = DTYPE_BYTES[dtype]
    targets = normalize_targets(lora_targets)
    n = shape.param_count()
    tokens = micro_batch * seq_len
    h, v, L = shape.hidden_size, shape.vocab_size, shape.num_layers

    # -- weights and what is trained
    if method == "qlora":
        quant = QUANT_BYTES_PER_PARAM["mlx-4bit-g64" if backend == "mlx" else "bnb-nf4-dq"]
        weights = math.ceil(shape.block_linear_params() * quant) + (shape.embedding_params() + shape.norm_params()) * 2
    else:
        weights = n * e
    if method == "full":
        trainable_params = n
        master = 4 if e < 4 else 0               # fp32 master copy in mixed precision
        trainable = n * (master + e + 8)         # + gradients in the compute dtype + two fp32 moments
    else:
        trainable_params = lora_params(shape, lora_r, targets)
        trainable = trainable_params * 16        # fp32 weights, fp32 gradients, two fp32 moments

    # -- activations saved for backward
    ce = 2 if method == "qlora" else e           # QLoRA computes in 16 bits
    layer = _layer_activation_bytes(shape, method, tokens, micro_batch, ce, lora_r, targets)
    if grad_checkpointing:
        # each block keeps only its input; one block is recomputed in full during backward
        saved = L * tokens * h * ce + layer
    else:
        saved = L * layer
    final_norm = tokens * h * 4 + (tokens * h * ce if method == "full" else 0)  # + lm_head input when trained
    # loss head at its peak (start of backward): fp32 log-probabilities (saved), their gradient, the
    # gradient of the logits, and the logits themselves in the compute dtype (fp32: one fewer copy)
    head = tokens * v * (8 + ce) if ce < 4 else tokens * v * 12
    # one block's backward working set: gradients of its widest tensors
    layer_backward = tokens * ce * (3 * shape.intermediate_size + 2 * h)
    if method == "qlora":  # the largest linear, dequantized for its matmul
        layer_backward += max(a * b for a, b in shape.linear_shapes().values()) * ce
    activations = saved + final_norm + max(head, layer_backward)

    fixed, frac = OVERHEAD[backend]
    subtotal = weights + trainable + activations
    overhead = fixed + math.ceil(frac * subtotal)
    return Estimate(
        method=method, dtype=dtype, backend=backend, micro_batch=micro_batch, seq_len=seq_len,
        grad_checkpointing=grad_checkpointing, params=n, trainable_params=trainable_params,
        weights=weights, trainable=trainable, activations=activations, overhead=overhead,
        total=subtotal + overhead,
    )


def max_micro_batch(budget_bytes: int, shape: ModelShape, limit: int = 4096, **kwargs) -> int:
    """The largest micro-batch whose estimate fits `budget_bytes` (0 if even 1 does not), at most `limit`.

    `kwargs` are `estimate`'s other arguments. The estimate is non-decreasing in micro-batch, so
    this is a binary search.
    """
    kwargs.pop("micro_batch", None)

    def fits(mb: int) -> bool:
        return estimate(shape, micro_batch=mb, **kwargs).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, limit
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
