"""What the training loop needs from a framework, and nothing more.

All tensors that leave a backend are numpy float32 arrays keyed by canonical adapter names
(see `swarm.adapters`): the loop, the network and checkpoints never see torch or mlx objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from swarm.config import RunConfig


@dataclass(frozen=True)
class Batch:
    """A micro-batch: ids int64 (mb, seq_len + 1); loss_mask uint8 (mb, seq_len), 1 where the
    prediction of ids[:, t + 1] carries loss (None: every target does). See `swarm.datasets`."""

    ids: np.ndarray
    loss_mask: np.ndarray | None = None


def as_batch(batch: "Batch | np.ndarray") -> Batch:
    """A plain token array is a batch whose every target carries loss."""
    if isinstance(batch, Batch):
        if batch.loss_mask is not None and batch.loss_mask.shape != (batch.ids.shape[0], batch.ids.shape[1] - 1):
            raise ValueError(f"loss_mask shape {batch.loss_mask.shape} does not match ids {batch.ids.shape}")
        return batch
    return Batch(np.asarray(batch))


@dataclass
class TrainResult:
    """What a peer trained this round."""

    grads: dict[str, np.ndarray]  # canonical name -> mean gradient over `tokens` (fp32), before clipping
    tokens: int                   # tokens that carry loss (masked prompt tokens excluded)
    loss_sum: float               # sum of per-token losses (mean loss = loss_sum / tokens)
    seconds: float                # wall time spent computing


@dataclass
class OptimizerState:
    """AdamW state in canonical layout: identical semantics on every backend."""

    step: int
    exp_avg: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg_sq: dict[str, np.ndarray] = field(default_factory=dict)


class Backend(Protocol):
    """A LoRA trainer for one base model. Implementations: torch_lora (peft), mlx_lora."""

    name: str

    def __init__(self, run: RunConfig, model_dir: Path, threads: int | None = None) -> None: ...

    def adapter_names(self) -> list[str]:
        """Canonical adapter tensor names, sorted."""

    def train(self, batches: Iterable[Batch | np.ndarray]) -> TrainResult:
        """Forward/backward over micro-batches (a plain int64 array (micro_batch, seq_len + 1) is a
        Batch without a mask); loss summed over the targets whose mask is 1; no update."""

    def apply_update(self, mean_grads: dict[str, np.ndarray]) -> None:
        """One AdamW step with this (already averaged) gradient, in canonical layout."""

    def get_adapter(self) -> dict[str, np.ndarray]:
        """Adapter tensors, canonical layout, fp32 copies."""

    def set_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        """Replace the adapter tensors (canonical layout)."""

    def get_optimizer(self) -> OptimizerState: ...

    def set_optimizer(self, state: OptimizerState) -> None: ...

    def eval_loss(self, batches: Iterable[Batch | np.ndarray]) -> float:
        """Mean loss per loss-carrying token, no gradient."""
