"""MLX LoRA backend (Apple Silicon GPU, or CPU via mlx[cpu] on Linux).

The base model is built by mlx-lm's model classes from the same safetensors the torch backend reads
(any HF directory whose `model_type` mlx-lm knows: Llama, Qwen2/3, Mistral, Gemma, Phi-3, GPT-2, ... ; an
unknown one is a one-line error), cast to the peer's base precision, frozen, and its target linears wrapped
in mlx-lm's `LoRALinear`. Everything that leaves this module is in the canonical layout, converted only by
`swarm.adapters.to_mlx` / `from_mlx`.

Base precisions (swarm.precision): fp32; bf16 (every float base weight in bfloat16); nf4, which on MLX is
mlx-lm's QLoRA: the linear layers of the decoder blocks become `nn.QuantizedLinear` (4-bit affine, one
scale and bias per group of 64 weights, 32 where a layer's input width needs it) via `nn.quantize`, the
rest stays bfloat16. Whatever the base, `lora_a`/`lora_b`, their gradients and the AdamW moments are fp32
(`LoRALinear` computes x @ lora_a in fp32 when the adapter is fp32 and casts the sum back to the
activations' dtype), so the adapter every peer applies the averaged update to is the torch peers' adapter.

Numerics follow the torch backend exactly in definition: loss = sum of token cross-entropies over
ids[:, :-1] -> ids[:, 1:], gradients divided by total tokens; AdamW = torch.optim.AdamW (bias correction
with python-float scalars, decoupled weight decay `p *= 1 - lr * wd`, eps added after dividing sqrt(v) by
sqrt(1 - beta2**t)). mlx.optimizers.AdamW differs (no bias correction by default, eps placement), so it
is not used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from swarm import SwarmError
from swarm.adapters import from_mlx, initial_adapter, module_of, scale, to_mlx
from swarm.backends.base import Batch, OptimizerState, TrainResult, as_batch
from swarm.config import RunConfig
from swarm.precision import PrecisionSettings

INSTALL_HINT = 'pip install -e ".[mlx]"'


QUANT_BITS = 4
QUANT_GROUPS = (64, 32)  #: group sizes tried in order; the memory model assumes 64 (swarm.memory)


def _mlx_lm():
    """mlx-lm's loader and LoRA layer, imported on first use; SwarmError (one line) if it is missing."""
    try:
        from mlx_lm.tuner.lora import LoRALinear
        from mlx_lm.utils import load_model
    except ImportError as e:
        raise SwarmError(f"--backend mlx needs mlx-lm ({getattr(e, 'name', None) or 'mlx_lm'} is missing): {INSTALL_HINT}") from None
    return load_model, LoRALinear


def covers(model_type: str) -> bool:
    """Whether the installed mlx-lm has a model class for this HF `model_type` (its own remapping applied)."""
    import importlib.util

    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(model_type, model_type)
    return bool(name) and name.isidentifier() and importlib.util.find_spec(f"mlx_lm.models.{name}") is not None


def _quantize_blocks(model: nn.Module) -> int:
    """mlx-lm's QLoRA base: every float Linear inside the decoder blocks -> 4-bit QuantizedLinear. Returns how many."""
    count = 0

    def predicate(path: str, module: nn.Module):
        nonlocal count
        if type(module) is not nn.Linear or ".layers." not in f".{path}":
            return False
        group = next((g for g in QUANT_GROUPS if module.weight.shape[1] % g == 0), None)
        if group is None:
            return False  # an input width no group size divides stays bfloat16
        count += 1
        return {"group_size": group, "bits": QUANT_BITS}

    nn.quantize(model, class_predicate=predicate)
    return count


def _targets(name: str, targets: tuple[str, ...] | None, module=None) -> bool:
    """peft's rule for a list of target_modules: the module path equals a target or ends with '.<target>'.

    None (peft's 'all-linear'): every float Linear inside the decoder layers (attention and MLP; not lm_head)."""
    if targets is None:
        return type(module) in (nn.Linear, nn.QuantizedLinear) and ".layers." in f".{name}"
    return any(name == t or name.endswith("." + t) for t in targets)


def load_lora_model(run: RunConfig, model_dir: Path, precision: PrecisionSettings | None = None
                    ) -> tuple[nn.Module, dict[str, str]]:
    """mlx-lm model from `model_dir` in the peer's base precision, frozen, LoRA on the run's target modules.

    Returns the model and {mlx parameter path: canonical name} for every adapter tensor.
    """
    load_model, LoRALinear = _mlx_lm()
    model_dir = Path(model_dir)
    prec = precision or PrecisionSettings(framework="mlx")
    model_type = _model_type(model_dir)
    if model_type is not None and not covers(model_type):
        raise SwarmError(f"mlx-lm cannot load the model at {model_dir}: mlx-lm {_version()} has no model class for model_type "
                         f"{model_type!r} (it covers Llama, Qwen2/3, Mistral, Gemma, Phi-3, GPT-2 and many more): "
                         "use --backend torch for this model")
    try:
        # lazily: each weight is read, cast and quantized on its own at the mx.eval below, so the whole fp32 or
        # 16-bit checkpoint is never in memory at once (a 131M fp32 checkpoint loaded as 4-bit: 789 -> 548 MB peak)
        loaded = load_model(model_dir, lazy=True, strict=True)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # older mlx-lm returns the model alone
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SwarmError(f"mlx-lm cannot load the model at {model_dir}: {str(e).splitlines()[0]}") from None
    model.set_dtype(mx.float32 if prec.precision == "fp32" else mx.bfloat16)
    if prec.precision == "nf4":
        _quantize_blocks(model)
    mx.eval(model.parameters())
    model.freeze()
    found = [(p, m) for p, m in model.named_modules() if _targets(p, run.lora.target_modules, m)]
    if not found:
        raise SwarmError(f"no module of the model at {model_dir} matches lora.target_modules {run.lora.target_modules}")
    wrapped = []
    for path, module in found:
        if type(module) not in (nn.Linear, nn.QuantizedLinear):
            raise SwarmError(f"LoRA target {path} is a {type(module).__name__}, not a Linear layer")
        wrapped.append((path, LoRALinear.from_base(module, r=run.lora.r, dropout=0.0, scale=scale(run))))
    model.update_modules(tree_unflatten(wrapped))
    if prec.gradient_checkpointing:  # mlx-lm's: every block recomputes its forward during backward
        from mlx_lm.tuner.trainer import grad_checkpoint

        block = type(model.layers[0])
        if not getattr(block, "_swarm_checkpointed", False):  # it patches the class: once per process
            grad_checkpoint(model.layers[0])
            block._swarm_checkpointed = True
    names = {}
    for path, _ in found:
        for leaf in ("lora_a", "lora_b"):
            (canon,) = from_mlx({f"{path}.{leaf}": np.zeros((1, 1), np.float32)})
            names[f"{path}.{leaf}"] = canon
    _check_hf_paths(model_dir, {p for p, _ in found})
    return model, names


def _model_type(model_dir: Path) -> str | None:
    try:
        t = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # load_model says what is wrong
    return t if isinstance(t, str) else None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-lm")
    except PackageNotFoundError:
        return "(unknown version)"


def _check_hf_paths(model_dir: Path, modules: set[str]) -> None:
    """Canonical names are HF module paths: refuse an architecture whose mlx-lm paths differ."""
    keys: set[str] = set()
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        keys = set(json.loads(index.read_text())["weight_map"])
    else:
        from safetensors import safe_open

        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="np") as st:
                keys.update(st.keys())
    missing = sorted(m for m in modules if f"{m}.weight" not in keys)
    if missing:
        raise SwarmError(f"mlx-lm names module {missing[0]} differently from the HF checkpoint; this architecture is not supported on mlx")


def _sum_ce(model: nn.Module, ids: mx.array, mask: mx.array | None = None) -> mx.array:
    logits = model(ids[:, :-1])
    if mask is None:
        return nn.losses.cross_entropy(logits.astype(mx.float32), ids[:, 1:], reduction="sum")
    return (nn.losses.cross_entropy(logits.astype(mx.float32), ids[:, 1:], reduction="none") * mask).sum()


def _mlx_batch(batch: Batch | np.ndarray) -> tuple[mx.array, mx.array | None, int]:
    """ids (int32), mask (float32 or None) and the count of loss-carrying tokens."""
    b = as_batch(batch)
    ids = mx.array(np.ascontiguousarray(b.ids, dtype=np.int64).astype(np.int32))
    if b.loss_mask is None:
        return ids, None, int(ids.shape[0] * (ids.shape[1] - 1))
    return ids, mx.array(np.ascontiguousarray(b.loss_mask, dtype=np.float32)), int(b.loss_mask.sum())


class MlxLoraBackend:
    name = "mlx"

    def __init__(self, run: RunConfig, model_dir: Path, threads: int | None = None, seed: int = 0,
                 precision: PrecisionSettings | None = None) -> None:
        # `threads` is accepted for interface parity: mlx sizes its own CPU pool and runs on the GPU on Apple Silicon.
        self.run = run
        self.device = str(mx.default_device())
        self.precision = precision or PrecisionSettings(framework="mlx")
        self.model, self._canon = load_lora_model(run, model_dir, self.precision)
        self._mlx_of = {c: p for p, c in self._canon.items()}
        self._names = sorted(self._mlx_of)
        self._shapes = {p: tuple(a.shape) for p, a in tree_flatten(self.model.trainable_parameters())}
        if set(self._shapes) != set(self._canon):
            raise SwarmError("mlx model: trainable parameters are not exactly the LoRA tensors")
        canon_shapes = {c: self._shapes[p][::-1] for p, c in self._canon.items()}
        self.set_adapter(initial_adapter(canon_shapes, seed))
        value_and_grad = nn.value_and_grad(self.model, _sum_ce)
        # Compiled as mlx-lm's trainer compiles its step; the model's state is an input (adapters change
        # between calls) and an output (value_and_grad writes the traced parameters back into the model).
        self._loss_and_grad = mx.compile(lambda ids: value_and_grad(self.model, ids),
                                         inputs=self.model.state, outputs=self.model.state)
        self._masked_loss_and_grad = mx.compile(lambda ids, mask: value_and_grad(self.model, ids, mask),
                                                inputs=self.model.state, outputs=self.model.state)
        self._step = 0
        self._m: dict[str, mx.array] = {}
        self._v: dict[str, mx.array] = {}

    def adapter_names(self) -> list[str]:
        return list(self._names)

    # --- training -----------------------------------------------------------------------------
    def train(self, batches: Iterable[Batch | np.ndarray]) -> TrainResult:
        start = time.perf_counter()
        total = None
        tokens, loss_sum = 0, 0.0
        for batch in batches:
            ids, mask, n = _mlx_batch(batch)
            loss, grads = self._loss_and_grad(ids) if mask is None else self._masked_loss_and_grad(ids, mask)
            total = grads if total is None else _tree_add(total, grads)
            mx.eval(loss, total, self.model.state)
            tokens += n
            loss_sum += float(loss.item())
        flat = dict(tree_flatten(total)) if total is not None else {}
        grads = {}
        for p, c in self._canon.items():
            g = np.array(flat[p], dtype=np.float32) if p in flat else np.zeros(self._shapes[p], np.float32)
            grads[p] = (g / max(tokens, 1)).astype(np.float32)
        return TrainResult(grads=from_mlx(grads), tokens=tokens, loss_sum=loss_sum, seconds=time.perf_counter() - start)

    def eval_loss(self, batches: Iterable[Batch | np.ndarray]) -> float:
        total, n = 0.0, 0
        for batch in batches:
            ids, mask, k = _mlx_batch(batch)
            loss = _sum_ce(self.model, ids, mask)
            total += float(loss.item())
            n += k
        return total / max(n, 1)

    def apply_update(self, mean_grads: dict[str, np.ndarray]) -> None:
        """One torch.optim.AdamW step (foreach=False semantics), op for op."""
        grads = self._to_params(mean_grads, "gradient")
        t = self.run.train
        b1, b2 = t.betas
        self._step += 1
        bias_correction1 = 1 - b1 ** float(self._step)          # python floats, as torch computes them
        bias_correction2 = 1 - b2 ** float(self._step)
        step_size = t.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        params = dict(tree_flatten(self.model.trainable_parameters()))
        new = []
        for p in self._names_mlx():
            g, w = grads[p], params[p]
            m = self._m.get(p, mx.zeros_like(w))
            v = self._v.get(p, mx.zeros_like(w))
            if t.weight_decay != 0:
                w = w * (1 - t.lr * t.weight_decay)
            m = m + (1 - b1) * (g - m)                              # exp_avg.lerp_(grad, 1 - beta1)
            v = v * b2 + (1 - b2) * (g * g)                         # exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
            denom = mx.sqrt(v) / bias_correction2_sqrt + t.eps
            w = w - step_size * (m / denom)                         # param.addcdiv_(exp_avg, denom, -step_size)
            self._m[p], self._v[p] = m, v
            new.append((p, w))
        self.model.update(tree_unflatten(new))
        mx.eval(self.model.trainable_parameters(), self._m, self._v)

    # --- state in canonical layout ------------------------------------------------------------
    def _names_mlx(self) -> list[str]:
        return [self._mlx_of[c] for c in self._names]

    def _to_params(self, tensors: dict[str, np.ndarray], what: str) -> dict[str, mx.array]:
        missing = sorted(set(self._names) - set(tensors))
        if missing:
            raise SwarmError(f"{what} lacks adapter tensor {missing[0]} ({len(missing)} missing)")
        extra = sorted(set(tensors) - set(self._names))
        if extra:
            raise SwarmError(f"{what} has unknown adapter tensor {extra[0]}")
        out = {}
        for p, a in to_mlx({c: np.asarray(tensors[c], dtype=np.float32) for c in self._names}).items():
            if tuple(a.shape) != self._shapes[p]:
                raise SwarmError(f"{what} tensor {self._canon[p]} has shape {a.shape[::-1]}, expected {self._shapes[p][::-1]}")
            out[p] = mx.array(a)
        return out

    def _from_params(self, arrays: dict[str, mx.array]) -> dict[str, np.ndarray]:
        return from_mlx({p: np.array(a, dtype=np.float32) for p, a in arrays.items()})

    def get_adapter(self) -> dict[str, np.ndarray]:
        params = dict(tree_flatten(self.model.trainable_parameters()))
        return self._from_params({p: params[p] for p in self._names_mlx()})

    def set_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        self.model.update(tree_unflatten(list(self._to_params(tensors, "adapter").items())))
        mx.eval(self.model.trainable_parameters())

    def get_optimizer(self) -> OptimizerState:
        if self._step == 0:
            return OptimizerState(step=0)
        return OptimizerState(step=self._step, exp_avg=self._from_params(self._m), exp_avg_sq=self._from_params(self._v))

    def set_optimizer(self, state: OptimizerState) -> None:
        if state.step == 0:
            self._step, self._m, self._v = 0, {}, {}
            return
        m = self._to_params(state.exp_avg, "optimizer exp_avg")
        v = self._to_params(state.exp_avg_sq, "optimizer exp_avg_sq")
        self._step, self._m, self._v = int(state.step), m, v

    def base_weights(self) -> dict[str, np.ndarray]:
        """The frozen base weights as this backend holds them, named as in the checkpoint, fp32 numpy."""
        wrapped = {module_of(c) for c in self._canon}
        out = {}
        for p, a in tree_flatten(self.model.parameters()):
            if p in self._canon:
                continue
            mod, _, leaf = p.rpartition(".")
            if mod.endswith(".linear") and mod[: -len(".linear")] in wrapped:
                p = f"{mod[: -len('.linear')]}.{leaf}"
            out[p] = np.array(a, dtype=np.float32)
        return out


def _tree_add(a, b):
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)
