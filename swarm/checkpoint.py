"""The training state (adapter + optimizer + round): atomic checkpoints, and the same on the wire.

A checkpoint directory is replaced whole (write a sibling, rename): a kill mid-save leaves the
previous checkpoint loadable. Loading checks everything (names, shapes, finiteness, the adapter
hash, the run fingerprint): state from disk or from another peer is never trusted blindly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from swarm import SwarmError
from swarm.adapters import adapter_sha256, recover_dir, write_dir_atomically
from swarm.backends.base import OptimizerState

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
MAX_SPEEDS = 1024           # entries of a state's pace: more is not a swarm's state but an attack
MAX_ROUND_SECONDS = 3600.0


class StateError(SwarmError):
    """State from disk or from a peer is unusable."""


@dataclass
class TrainingState:
    round: int                        # last completed global round (0 = untrained)
    adapter: dict[str, np.ndarray]    # canonical layout
    optimizer: OptimizerState
    fingerprint: str                  # RunConfig.fingerprint() of the run it belongs to
    # The pace the next plan is made from: every member of the last group derived it from the same shared
    # measurements, and a joiner downloads it with the adapter, so all peers plan the next round alike.
    speeds: dict[str, float] = field(default_factory=dict)  # peer -> smoothed full-speed tokens/s
    round_seconds: float | None = None  # the slowest member's training time in the last round (adapts the deadline)

    @property
    def adapter_sha256(self) -> str:
        return adapter_sha256(self.adapter)

    # --- wire: (metadata, [arrays]) ------------------------------------------------------------
    def to_wire(self) -> tuple[dict, list[np.ndarray]]:
        names = sorted(self.adapter)
        has_opt = self.optimizer.step > 0
        arrays = [self.adapter[n] for n in names]
        if has_opt:
            arrays += [self.optimizer.exp_avg[n] for n in names] + [self.optimizer.exp_avg_sq[n] for n in names]
        meta = {"round": self.round, "fingerprint": self.fingerprint, "names": names, "optimizer_step": self.optimizer.step,
                "adapter_sha256": self.adapter_sha256, "speeds": dict(sorted(self.speeds.items())),
                "round_seconds": self.round_seconds}
        return meta, [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]

    @classmethod
    def from_wire(cls, meta: object, arrays: list[np.ndarray], shapes: dict[str, tuple[int, ...]],
                  fingerprint: str, source: str) -> "TrainingState":
        """Validate state received from `source`; StateError saying what is wrong."""
        if not isinstance(meta, dict):
            raise StateError(f"state from {source}: metadata is not a mapping")
        names = sorted(shapes)
        if meta.get("fingerprint") != fingerprint:
            raise StateError(f"state from {source} belongs to another run configuration")
        if meta.get("names") != names:
            raise StateError(f"state from {source} has different adapter tensors")
        rnd, step = meta.get("round"), meta.get("optimizer_step")
        if not (isinstance(rnd, int) and rnd >= 0 and isinstance(step, int) and step >= 0):
            raise StateError(f"state from {source}: bad round or optimizer step")
        expected = len(names) * (3 if step > 0 else 1)
        if len(arrays) != expected:
            raise StateError(f"state from {source}: {len(arrays)} tensors, expected {expected}")
        arrays = [np.asarray(a) for a in arrays]
        for i, a in enumerate(arrays):
            n = names[i % len(names)]
            if a.dtype != np.float32 or tuple(a.shape) != tuple(shapes[n]):
                raise StateError(f"state from {source}: tensor {n} is {a.dtype}{tuple(a.shape)}, expected float32{tuple(shapes[n])}")
            if not np.all(np.isfinite(a)):
                raise StateError(f"state from {source}: tensor {n} has NaN or inf")
        k = len(names)
        adapter = dict(zip(names, arrays[:k]))
        opt = OptimizerState(step=step)
        if step > 0:
            opt.exp_avg = dict(zip(names, arrays[k:2 * k]))
            opt.exp_avg_sq = dict(zip(names, arrays[2 * k:]))
        speeds, seconds = meta.get("speeds", {}), meta.get("round_seconds")
        if not (isinstance(speeds, dict) and len(speeds) <= MAX_SPEEDS and all(
                isinstance(k, str) and len(k) <= 128 and type(v) is float and math.isfinite(v) and 0 < v < 1e9
                for k, v in speeds.items())):
            raise StateError(f"state from {source}: bad speeds")
        if not (seconds is None or (type(seconds) is float and 0 <= seconds <= MAX_ROUND_SECONDS)):
            raise StateError(f"state from {source}: bad round_seconds")
        state = cls(round=rnd, adapter=adapter, optimizer=opt, fingerprint=fingerprint, speeds=speeds,
                    round_seconds=seconds)
        if state.adapter_sha256 != meta.get("adapter_sha256"):
            raise StateError(f"state from {source}: adapter hash does not match its metadata")
        return state


# --- disk ----------------------------------------------------------------------------------------
def save(directory: Path, state: TrainingState) -> None:
    from safetensors.numpy import save as st_save

    meta, arrays = state.to_wire()
    payload = st_save({f"{i:05d}": a for i, a in enumerate(arrays)})
    write_dir_atomically(Path(directory), {STATE_FILE: payload, META_FILE: json.dumps(meta, indent=1).encode()})


def load(directory: Path, shapes: dict[str, tuple[int, ...]], fingerprint: str) -> TrainingState | None:
    """The checkpoint in `directory`, None if there is none; StateError if it is corrupt or foreign."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    recover_dir(directory)  # a kill mid-swap set the previous checkpoint aside: it is still the checkpoint
    if not directory.exists():
        return None
    hint = "delete it to start over, or restart this peer with --initial-peers to download the state from the swarm"
    try:
        meta = json.loads((directory / META_FILE).read_text())
        tensors = load_file(str(directory / STATE_FILE))
        arrays = [tensors[k] for k in sorted(tensors)]
    except Exception as e:
        raise StateError(f"checkpoint {directory} is unreadable ({type(e).__name__}): {hint}") from None
    try:
        return TrainingState.from_wire(meta, arrays, shapes, fingerprint, source=f"checkpoint {directory}")
    except StateError as e:
        raise StateError(f"{e}: {hint}") from None
