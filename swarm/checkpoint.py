"""The training state (adapter + optimizer + round): atomic checkpoints, and the same on the wire.

A checkpoint directory is replaced whole (write a sibling, rename): a kill mid-save leaves the
previous checkpoint loadable. Loading checks everything (names, shapes, finiteness, the adapter
hash, the run fingerprint, the lineage): state from disk or from another peer is never trusted blindly.

Lineage: a state's identity across frameworks. torch and MLX peers hold adapters equal only within
float tolerance, but every member of a group applies the bit-identical averaged update, so a chain
hash over the updates names "the same state" on every framework:
    lineage(0) = H(fingerprint, initial adapter hash)
    lineage(r) = H(lineage(r-1), r, H(averaged update), work(r), pace(r) [, H(outer momentum)])
where work(r) is the tokens the swarm trained in rounds 1..r on this chain and pace(r) the speeds and
round time the next plan is made from. Members average only with members of the same lineage (it is
part of the group key), forks are told apart and ranked by it (heaviest work wins), and because the
pace and the work are inside the hash, a downloaded state's pace is covered by the same majority check
as its lineage. In local-steps mode (swarm.local_steps) the state also carries the outer optimizer's
momentum buffer, bit-identical on every member; its hash is the lineage's last field, so the same
majority check covers it (a state without momentum hashes exactly as before the mode existed).
"""

from __future__ import annotations

import json
import math
import hashlib
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
ANCESTRY = 256              # rounds of (lineage, work) a state remembers: enough to find where two forks split
MAX_WORK = 1 << 62


def genesis_lineage(fingerprint: str, adapter_sha: str) -> str:
    return hashlib.sha256(f"swarm-genesis|{fingerprint}|{adapter_sha}".encode()).hexdigest()


def next_lineage(parent: str, round_: int, update_sha256: str, work: int, speeds: dict[str, float],
                 round_seconds: float | None, momentum_sha256: str = "") -> str:
    pace = json.dumps([sorted(speeds.items()), round_seconds], separators=(",", ":"))
    outer = f"|{momentum_sha256}" if momentum_sha256 else ""
    return hashlib.sha256(f"{parent}|{round_}|{update_sha256}|{work}|{pace}{outer}".encode()).hexdigest()


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
    # Lineage (see the module docstring): "" = derive the genesis lineage (round 0) or a legacy one
    lineage: str = ""
    parent: str = ""                  # lineage of round - 1
    update_sha256: str = ""           # hash of the averaged update applied in this round
    work: int = 0                     # tokens trained by the swarm in rounds 1..round on this chain
    ancestry: dict[int, tuple[str, int]] = field(default_factory=dict)  # recent round -> (lineage, work), this one included
    momentum: dict[str, np.ndarray] = field(default_factory=dict)  # local-steps mode: the outer Nesterov buffer ({} = none)

    def __post_init__(self) -> None:
        if not self.lineage:
            self.lineage = (genesis_lineage(self.fingerprint, self.adapter_sha256) if self.round == 0 else
                            hashlib.sha256(f"swarm-legacy|{self.round}|{self.adapter_sha256}".encode()).hexdigest())
        self.ancestry = {r: v for r, v in self.ancestry.items() if r > self.round - ANCESTRY and r < self.round}
        self.ancestry[self.round] = (self.lineage, self.work)

    @property
    def adapter_sha256(self) -> str:
        return adapter_sha256(self.adapter)

    @property
    def state_sha256(self) -> str:
        """The whole training state a peer resumes from: adapter, optimizer step and moments, and the lineage
        (which covers the pace and the work). This, not the adapter alone, is what peers vote on: a state
        with the majority's adapter but other moments is another state (security review, item 9)."""
        h = hashlib.sha256(f"swarm-state|{self.adapter_sha256}|{self.lineage}|{self.optimizer.step}".encode())
        for moments in (self.optimizer.exp_avg, self.optimizer.exp_avg_sq):
            for name in sorted(moments or {}):
                h.update(name.encode() + b"|")
                h.update(np.ascontiguousarray(moments[name], dtype=np.float32).tobytes())
        return h.hexdigest()

    @property
    def momentum_sha256(self) -> str:
        return adapter_sha256(self.momentum) if self.momentum else ""

    def verified_lineage(self) -> bool:
        """Does the lineage follow from what the state carries (parent, update, work, pace)?"""
        if self.round == 0:
            return self.lineage == genesis_lineage(self.fingerprint, self.adapter_sha256)
        if not self.parent:  # a state from before lineages: nothing to check it against
            return self.lineage == hashlib.sha256(f"swarm-legacy|{self.round}|{self.adapter_sha256}".encode()).hexdigest()
        return self.lineage == next_lineage(self.parent, self.round, self.update_sha256, self.work, self.speeds,
                                            self.round_seconds, self.momentum_sha256)

    # --- wire: (metadata, [arrays]) ------------------------------------------------------------
    def to_wire(self) -> tuple[dict, list[np.ndarray]]:
        names = sorted(self.adapter)
        has_opt = self.optimizer.step > 0
        arrays = [self.adapter[n] for n in names]
        if has_opt:
            arrays += [self.optimizer.exp_avg[n] for n in names] + [self.optimizer.exp_avg_sq[n] for n in names]
        if self.momentum:
            arrays += [self.momentum[n] for n in names]
        meta = {"round": self.round, "fingerprint": self.fingerprint, "names": names, "optimizer_step": self.optimizer.step,
                "adapter_sha256": self.adapter_sha256, "speeds": dict(sorted(self.speeds.items())),
                "round_seconds": self.round_seconds, "lineage": self.lineage, "parent": self.parent,
                "update_sha256": self.update_sha256, "work": self.work,
                "ancestry": [[r, lin, w] for r, (lin, w) in sorted(self.ancestry.items())]}
        if self.momentum:
            meta["momentum"] = True
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
        if step > rnd:  # one optimizer step per committed round
            raise StateError(f"state from {source}: optimizer step {step} is past its round {rnd}")
        has_momentum = meta.get("momentum", False)
        if type(has_momentum) is not bool:
            raise StateError(f"state from {source}: bad momentum flag")
        expected = len(names) * ((3 if step > 0 else 1) + has_momentum)
        if len(arrays) != expected:
            raise StateError(f"state from {source}: {len(arrays)} tensors, expected {expected}")
        arrays = [np.asarray(a) for a in arrays]
        for i, a in enumerate(arrays):
            n = names[i % len(names)]
            if a.dtype != np.float32 or tuple(a.shape) != tuple(shapes[n]):
                raise StateError(f"state from {source}: tensor {n} is {a.dtype}{tuple(a.shape)}, expected float32{tuple(shapes[n])}")
            if not np.all(np.isfinite(a)):
                raise StateError(f"state from {source}: tensor {n} has NaN or inf")
            if i >= 2 * len(names) and np.any(a < 0):  # Adam's second moments are averages of squares
                raise StateError(f"state from {source}: optimizer exp_avg_sq of {n} has negative values")
        k = len(names)
        adapter = dict(zip(names, arrays[:k]))
        opt = OptimizerState(step=step)
        if step > 0:
            opt.exp_avg = dict(zip(names, arrays[k:2 * k]))
            opt.exp_avg_sq = dict(zip(names, arrays[2 * k:3 * k]))
        momentum = dict(zip(names, arrays[-k:])) if has_momentum else {}
        speeds, seconds = meta.get("speeds", {}), meta.get("round_seconds")
        if not (isinstance(speeds, dict) and len(speeds) <= MAX_SPEEDS and all(
                isinstance(k, str) and len(k) <= 128 and type(v) is float and math.isfinite(v) and 0 < v < 1e9
                for k, v in speeds.items())):
            raise StateError(f"state from {source}: bad speeds")
        if not (seconds is None or (type(seconds) is float and 0 <= seconds <= MAX_ROUND_SECONDS)):
            raise StateError(f"state from {source}: bad round_seconds")
        lineage, parent, update, work = (meta.get(k, d) for k, d in
                                         (("lineage", ""), ("parent", ""), ("update_sha256", ""), ("work", 0)))
        ancestry = meta.get("ancestry", [])
        hexes = (lineage, parent, update)
        if not (all(isinstance(h, str) and len(h) in (0, 64) and all(c in "0123456789abcdef" for c in h) for h in hexes)
                and type(work) is int and 0 <= work <= MAX_WORK and isinstance(ancestry, list)
                and len(ancestry) <= ANCESTRY + 1 and all(
                    isinstance(a, list) and len(a) == 3 and type(a[0]) is int and isinstance(a[1], str)
                    and len(a[1]) == 64 and type(a[2]) is int for a in ancestry)):
            raise StateError(f"state from {source}: bad lineage")
        state = cls(round=rnd, adapter=adapter, optimizer=opt, fingerprint=fingerprint, speeds=speeds,
                    round_seconds=seconds, lineage=lineage, parent=parent, update_sha256=update, work=work,
                    ancestry={a[0]: (a[1], a[2]) for a in ancestry}, momentum=momentum)
        if state.adapter_sha256 != meta.get("adapter_sha256"):
            raise StateError(f"state from {source}: adapter hash does not match its metadata")
        if not state.verified_lineage():
            raise StateError(f"state from {source}: its lineage does not follow from its parent, update, work and pace")
        return state

    def successor(self, *, round_: int, adapter: dict[str, np.ndarray], optimizer: OptimizerState,
                  update_sha256: str, tokens: int, speeds: dict[str, float], round_seconds: float | None,
                  momentum: dict[str, np.ndarray] | None = None) -> "TrainingState":
        """The state after applying round `round_`'s averaged update (hash `update_sha256`, `tokens` trained);
        `momentum`: the outer momentum after it (local-steps mode)."""
        work = min(self.work + tokens, MAX_WORK)
        momentum = momentum or {}
        lineage = next_lineage(self.lineage, round_, update_sha256, work, speeds, round_seconds,
                               adapter_sha256(momentum) if momentum else "")
        return TrainingState(round=round_, adapter=adapter, optimizer=optimizer, fingerprint=self.fingerprint,
                             speeds=speeds, round_seconds=round_seconds, lineage=lineage, parent=self.lineage,
                             update_sha256=update_sha256, work=work, ancestry=dict(self.ancestry), momentum=momentum)


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
