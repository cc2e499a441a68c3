"""Local-steps mode (DiLoCo): H inner AdamW steps per round, then one outer Nesterov step on the average.

`train.local_steps` H > 1. Each peer splits its round quota (its micro-batches, in order) into H
inner steps; each inner step is a local AdamW step on that part's mean gradient, clipped to
`train.max_grad_norm` as in the synchronous mode. The peer's contribution is then its
pseudo-gradient `start - end` (the adapter the round started from minus the one it ended with),
averaged token-weighted through the same exact all-reduce as gradients. Every member then applies
one outer Nesterov-SGD step to the round's start adapter (`outer_step`, numpy float64: the same
bits on every peer and framework), so after every outer round every peer holds a bit-identical
adapter and momentum buffer.

Budget: one outer round trains `train.tokens_per_round` tokens, as a synchronous round does, and
sends the same bytes; to send H times fewer bytes per trained token, raise tokens_per_round H times
(each inner step then trains as many tokens as a synchronous round's step did).

State: the outer momentum buffer is shared state (`TrainingState.momentum`: checkpointed, served
to joiners, inside the lineage so state votes cover it). The inner AdamW moments stay local to each
peer, as in DiLoCo: they are not part of the shared state (a joiner or a resumed peer starts them
fresh), and they never reach the adapter except through the averaged pseudo-gradient, so they cannot
break the invariant. A round that is rolled back restores the start adapter and the inner moments.

LoRA factors: after local steps, averaging A and B separately is not averaging B.A (the error is
the covariance of the peers' B and A changes, second order in local progress; scripts/bench_local_steps.py
measures it). `train.lora_factor: alternate` trains only B in odd rounds and only A in even ones
(RoLoRA; B first, since A's gradient is zero while B is): the frozen factor is identical on every
peer, so mean(B_i A) = mean(B_i) A exactly.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from swarm.averaging import clip_by_norm, flatten, unflatten
from swarm.backends.base import Batch, OptimizerState, TrainResult
from swarm.config import TrainConfig

# bound of one coordinate of one AdamW step, in units of lr: |m_hat / sqrt(v_hat)| <= (1 - b1) / sqrt(1 - b2) (3.2 at
# the default betas); the pseudo-gradient's L2 norm is then at most H * lr * that * sqrt(values) (+ weight decay)
_ADAM_BOUND_FLOOR = 1.0


def averaging_clip(train: TrainConfig, values: int) -> float:
    """The L2 bound a contribution is clipped to (and checked against by every reducer): `max_grad_norm` for
    gradients; for pseudo-gradients a bound no honest peer reaches (H AdamW steps of at most ~lr per value)."""
    if train.local_steps == 1:
        return train.max_grad_norm
    b1, b2 = train.betas
    per_value = max(_ADAM_BOUND_FLOOR, (1 - b1) / math.sqrt(1 - b2)) + train.weight_decay
    return float(2.0 ** math.ceil(math.log2(train.local_steps * train.lr * per_value * math.sqrt(max(values, 1)))))


def trained_factor(train: TrainConfig, round_: int) -> str | None:
    """'lora_A' / 'lora_B': the only factor trained in outer round `round_`; None: both."""
    if train.lora_factor == "both":
        return None
    return "lora_B" if round_ % 2 == 1 else "lora_A"


def inner_split(micro_steps: int, steps: int) -> list[int]:
    """Micro-batches per inner step: `micro_steps` in `steps` nearly equal contiguous parts (empty ones dropped)."""
    base, extra = divmod(micro_steps, steps)
    return [n for n in (base + (i < extra) for i in range(steps)) if n]


def outer_step(start: dict[str, np.ndarray], pseudo_grad: dict[str, np.ndarray], momentum: dict[str, np.ndarray] | None,
               lr: float, mu: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Nesterov SGD (as torch.optim.SGD(nesterov=True), dampening 0): m' = mu m + g; p' = p - lr (g + mu m').

    Pure and deterministic: float64 element-wise numpy arithmetic on float32 inputs, float32 results. The
    momentum is rounded to float32 (as it is stored) before it is used, so the stored state alone determines
    the next step. `momentum` None or empty: zeros (the first outer step)."""
    adapter, new_m = {}, {}
    for n in sorted(start):
        g = np.asarray(pseudo_grad[n], dtype=np.float32).astype(np.float64)
        m_prev = np.asarray(momentum[n], dtype=np.float32).astype(np.float64) if momentum else 0.0
        m = (mu * m_prev + g).astype(np.float32)
        update = g + mu * m.astype(np.float64)
        adapter[n] = (np.asarray(start[n], dtype=np.float32).astype(np.float64) - lr * update).astype(np.float32)
        new_m[n] = m
    return adapter, new_m


def ab_mismatch(start: dict[str, np.ndarray], ends: list[dict[str, np.ndarray]]) -> float:
    """||mean_i(B_i A_i) - mean(B_i) mean(A_i)|| / ||mean_i(B_i A_i) - B_0 A_0|| over every adapted module: how far
    averaging the factors is from averaging the products, relative to the update of the products."""
    err = ref = 0.0
    for a_name in sorted(n for n in start if n.endswith(".lora_A")):
        b_name = a_name[: -len("lora_A")] + "lora_B"
        prods = [e[b_name].astype(np.float64) @ e[a_name].astype(np.float64) for e in ends]
        mean_prod = sum(prods) / len(prods)
        mean_b = sum(e[b_name].astype(np.float64) for e in ends) / len(ends)
        mean_a = sum(e[a_name].astype(np.float64) for e in ends) / len(ends)
        err += float(np.sum((mean_prod - mean_b @ mean_a) ** 2))
        ref += float(np.sum((mean_prod - start[b_name].astype(np.float64) @ start[a_name].astype(np.float64)) ** 2))
    return math.sqrt(err / ref) if ref > 0 else 0.0


@dataclass
class LocalSteps:
    """A peer's local-steps mode: Peer calls `train`, then `commit` or `restore`."""

    train_config: TrainConfig
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    _inner: OptimizerState | None = field(default=None, repr=False)  # inner moments at the round's start (restore)

    def train(self, backend, batches: Iterable[Batch | np.ndarray], micro_steps: int, round_: int,
              start: dict[str, np.ndarray]) -> TrainResult:
        """H inner AdamW steps from `start` (the shared state's adapter) over `batches` (`micro_steps` micro-batches,
        fewer if the pacer cuts the round short); the result's grads are the pseudo-gradient start - end (float64)."""
        t0 = time.perf_counter()
        t = self.train_config
        self._inner = backend.get_optimizer()
        backend.set_adapter(start)
        only = trained_factor(t, round_)
        frozen = {n: start[n] for n in self.names if only is not None and not n.endswith(only)}
        it = iter(batches)
        tokens, loss_sum = 0, 0.0
        for n in inner_split(micro_steps, t.local_steps):
            part = backend.train(itertools.islice(it, n))
            if not part.tokens:
                break  # cut short (deadline, stop, pause): contribute what was trained
            grads = {**part.grads, **{n: np.zeros_like(start[n]) for n in frozen}}  # the frozen factor gets no step
            flat, _ = clip_by_norm(flatten(grads, self.names), t.max_grad_norm)
            backend.apply_update(unflatten(flat, self.names, self.shapes))
            if frozen:  # AdamW's momentum (and weight decay) would still move it: put it back
                backend.set_adapter({**backend.get_adapter(), **frozen})
            tokens += part.tokens
            loss_sum += part.loss_sum
        end = backend.get_adapter()
        pseudo = {n: start[n].astype(np.float64) - end[n].astype(np.float64) for n in self.names}
        return TrainResult(grads=pseudo, tokens=tokens, loss_sum=loss_sum, seconds=time.perf_counter() - t0)

    def commit(self, backend, start: dict[str, np.ndarray], mean_pseudo_grad: dict[str, np.ndarray],
               momentum: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outer step on the round's start adapter: the backend then holds the new adapter (its inner moments
        are kept); returns the new momentum."""
        t = self.train_config
        adapter, new_m = outer_step(start, mean_pseudo_grad, momentum, t.outer_lr, t.outer_momentum)
        backend.set_adapter(adapter)
        self._inner = None
        return new_m

    def restore(self, backend, start: dict[str, np.ndarray]) -> None:
        """Nothing applied this round: back to its start adapter and inner moments."""
        backend.set_adapter(start)
        if self._inner is not None:
            backend.set_optimizer(self._inner)
            self._inner = None


def shared_optimizer() -> OptimizerState:
    """The optimizer part of a local-steps state: empty (the inner moments are local; the outer one is `momentum`)."""
    return OptimizerState(step=0)
