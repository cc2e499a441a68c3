"""torch + peft LoRA backend (CUDA, ROCm, MPS or CPU)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from swarm import SwarmError
from swarm.adapters import fan_in_fan_out, from_peft_key, initial_adapter, peft_targets
from swarm.backends.base import Batch, OptimizerState, TrainResult, as_batch
from swarm.config import RunConfig
from swarm.precision import PrecisionSettings


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")


_TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint files transformers would load: the index's shards, else model.safetensors ([] if neither)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []  # transformers says what is wrong
        files = [model_dir / f for f in shards]
        return files if all(f.is_file() for f in files) else []
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def _from_pretrained(model_dir: Path, kwargs: dict):
    """`from_pretrained` that reads each checkpoint tensor with pread instead of through an mmap of the file.

    Why: transformers maps every safetensors file and keeps it mapped until the whole model is loaded. When
    the tensors are converted on the way (an fp32 checkpoint loaded as bf16, a bf16 one as fp32) or
    quantized (nf4), every page of the file is touched and counts in the process's resident memory next to the
    converted copies: a 131M fp32 checkpoint loaded as nf4 peaked at 1034 MB instead of 544 (measured, VmHWM),
    and a 7B fp32 checkpoint would need its 27 GB resident to become 4 GB of nf4. Read with pread, one tensor is
    in flight at a time and the file's bytes stay in the page cache, outside the process: the load peaks at the
    model as it will train, plus one tensor (what swarm.memory predicts). Same tensors, same values; checkpoints
    that are not safetensors, and configs without a transformers class, load the ordinary way."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import transformers
    from safetensors import safe_open

    files = _safetensors_files(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    lazy_state_dicts = int(transformers.__version__.split(".")[0]) >= 5  # 4.x wants tensors in state_dict
    if not files or cls is None or not lazy_state_dicts:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    handles, state = [], {}
    try:
        try:
            handles = [safe_open(str(f), framework="pt", backend="pread") for f in files]
        except TypeError:  # a safetensors without the pread backend
            return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        state = {k: h.get_slice(k) for h in handles for k in h.keys()}  # lazy: read when transformers loads it
        return cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    finally:
        state.clear()
        for h in handles:
            h.__exit__(None, None, None)


def load_peft_model(run: RunConfig, model_dir: Path, device: str = "cpu", precision: PrecisionSettings | None = None):
    """The base model from `model_dir` in the peer's precision, wrapped with the run's LoRA (peft).

    Whatever the base precision, every LoRA parameter is cast to fp32 (swarm.precision says why)."""
    from peft import LoraConfig, get_peft_model

    _quiet_transformers()
    prec = precision or PrecisionSettings()
    kwargs: dict = {"dtype": _TORCH_DTYPE[prec.dtype]}
    if prec.precision == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_TORCH_DTYPE[prec.dtype])
        kwargs["device_map"] = {"": device}
    base = _from_pretrained(Path(model_dir), kwargs)
    base.config.use_cache = False
    if prec.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    targets = peft_targets(run)
    cfg = LoraConfig(r=run.lora.r, lora_alpha=run.lora.alpha, lora_dropout=0.0, target_modules=targets,
                     fan_in_fan_out=fan_in_fan_out(model_dir), bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base, cfg)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model ..."
        raise SwarmError(f"no linear layer of the model at {model_dir} matches lora.target_modules {targets}"
                         f" ({str(e).splitlines()[0][:200]})") from None
    if prec.precision != "nf4":  # a quantized model is placed by device_map and cannot be moved
        model = model.to(device)
    for p in model.parameters():
        if p.requires_grad:  # the adapter: fp32 on every peer whatever the base (exact averaging)
            p.data = p.data.to(torch.float32)
    return model


class TorchLoraBackend:
    name = "torch"

    def __init__(self, run: RunConfig, model_dir: Path, threads: int | None = None, device: str = "cpu", seed: int = 0,
                 precision: PrecisionSettings | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.run = run
        self.device = torch.device(device)
        self.precision = precision or PrecisionSettings()
        self.model = load_peft_model(run, model_dir, device, self.precision)
        self.params: dict[str, torch.nn.Parameter] = {
            from_peft_key(n): p for n, p in self.model.named_parameters() if p.requires_grad
        }
        self._names = sorted(self.params)
        self.set_adapter(initial_adapter({k: tuple(p.shape) for k, p in self.params.items()}, seed))
        t = run.train
        self.optimizer = torch.optim.AdamW([self.params[k] for k in self._names], lr=t.lr, betas=t.betas,
                                           eps=t.eps, weight_decay=t.weight_decay, foreach=False)

    def adapter_names(self) -> list[str]:
        return list(self._names)

    def _loss_sum(self, batch: Batch | np.ndarray) -> tuple[torch.Tensor, int]:
        b = as_batch(batch)
        ids = torch.from_numpy(np.ascontiguousarray(b.ids, dtype=np.int64)).to(self.device)
        logits = self.model(input_ids=ids[:, :-1]).logits
        labels = ids[:, 1:]
        flat = logits.reshape(-1, logits.shape[-1]).float()
        if b.loss_mask is None:
            loss = F.cross_entropy(flat, labels.reshape(-1), reduction="sum")
            return loss, labels.numel()
        mask = torch.from_numpy(np.ascontiguousarray(b.loss_mask, dtype=np.float32)).to(self.device).reshape(-1)
        loss = (F.cross_entropy(flat, labels.reshape(-1), reduction="none") * mask).sum()
        return loss, int(b.loss_mask.sum())

    def train(self, batches: Iterable[Batch | np.ndarray]) -> TrainResult:
        start = time.perf_counter()
        self.model.train()
        for p in self.params.values():
            p.grad = None
        tokens, loss_sum = 0, 0.0
        for batch in batches:
            loss, n = self._loss_sum(batch)
            loss.backward()
            tokens += n
            loss_sum += float(loss.detach())
        grads = {}
        for k in self._names:
            g = self.params[k].grad
            grads[k] = (g.detach().to("cpu", torch.float32).numpy() / max(tokens, 1)).astype(np.float32) if g is not None \
                else np.zeros(tuple(self.params[k].shape), np.float32)
            self.params[k].grad = None
        return TrainResult(grads=grads, tokens=tokens, loss_sum=loss_sum, seconds=time.perf_counter() - start)

    @torch.no_grad()
    def eval_loss(self, batches: Iterable[Batch | np.ndarray]) -> float:
        self.model.eval()
        total, n = 0.0, 0
        for batch in batches:
            loss, k = self._loss_sum(batch)
            total += float(loss)
            n += k
        return total / max(n, 1)

    def apply_update(self, mean_grads: dict[str, np.ndarray]) -> None:
        for k in self._names:
            self.params[k].grad = torch.from_numpy(np.ascontiguousarray(mean_grads[k], dtype=np.float32)).to(self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_adapter(self) -> dict[str, np.ndarray]:
        return {k: self.params[k].detach().to("cpu", torch.float32).numpy().copy() for k in self._names}

    @torch.no_grad()
    def set_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        for k in self._names:
            self.params[k].copy_(torch.from_numpy(np.ascontiguousarray(tensors[k], dtype=np.float32)))

    def get_optimizer(self) -> OptimizerState:
        st = OptimizerState(step=0)
        for k in self._names:
            s = self.optimizer.state.get(self.params[k])
            if not s:
                continue
            st.step = int(s["step"])
            st.exp_avg[k] = s["exp_avg"].detach().cpu().numpy().copy()
            st.exp_avg_sq[k] = s["exp_avg_sq"].detach().cpu().numpy().copy()
        return st

    def set_optimizer(self, state: OptimizerState) -> None:
        self.optimizer.state.clear()
        if state.step == 0:
            return
        for k in self._names:
            p = self.params[k]
            self.optimizer.state[p] = {
                "step": torch.tensor(float(state.step)),
                "exp_avg": torch.from_numpy(np.array(state.exp_avg[k], dtype=np.float32)).to(self.device),
                "exp_avg_sq": torch.from_numpy(np.array(state.exp_avg_sq[k], dtype=np.float32)).to(self.device),
            }
