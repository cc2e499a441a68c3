"""The run configuration: a typed tree loaded from YAML, validated on construction.

Every field has a docstring; unknown keys are errors (a typo must not be silently ignored).
The embedded default run (`default_run()`) needs no file and no download.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarm import SwarmError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuiltinModel(_Strict):
    """A small Llama-style model generated locally from a seed (no download)."""

    vocab_size: int = Field(260, ge=260, description="byte-level vocabulary: 256 bytes + 4 specials")
    hidden_size: int = Field(256, ge=8, description="model width")
    intermediate_size: int = Field(688, ge=8, description="MLP width")
    num_hidden_layers: int = Field(4, ge=1, description="transformer blocks")
    num_attention_heads: int = Field(4, ge=1, description="query heads")
    num_key_value_heads: int = Field(4, ge=1, description="key/value heads (GQA when fewer than query heads)")
    max_position_embeddings: int = Field(1024, ge=16, description="longest sequence")
    seed: int = Field(0, description="seed of the base weights: the same seed gives the same weights everywhere")


class ModelConfig(_Strict):
    """Which base model the run fine-tunes."""

    path: str | None = Field(None, description="local Hugging Face model directory; None = the embedded default")
    builtin: BuiltinModel = Field(default_factory=BuiltinModel, description="the embedded model, used when path is None")


class LoraConfig(_Strict):
    """The adapter: identical on every peer of a run."""

    r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    target_modules: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="names of the linear layers that get an adapter; null/omitted = every linear layer of attention and MLP "
        "(peft's 'all-linear': any family, e.g. GPT-2's c_attn/c_proj/c_fc, Phi-3's qkv_proj/gate_up_proj)",
    )


class TrainConfig(_Strict):
    """Local training and the optimizer every peer applies to the averaged gradient."""

    seq_len: int = Field(128, ge=8, description="tokens per sequence")
    micro_batch: int = Field(8, ge=1, description="sequences per forward/backward (the planner may lower it to fit memory)")
    tokens_per_round: int = Field(6144, ge=8, description="global token budget of one round, split among peers")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="each peer clips its mean gradient to this L2 norm before averaging")
    precisions: tuple[Literal["fp32", "bf16", "fp16", "nf4"], ...] = Field(
        ("fp32", "bf16", "fp16", "nf4"), min_length=1, max_length=4,
        description="precisions of the frozen base a peer may train in (swarm.precision); each peer picks the most "
        "precise one it can run. The adapter, its gradients and optimizer state are fp32 on every peer")
    local_steps: int = Field(
        1, ge=1, le=1024, description="local-steps mode (DiLoCo, swarm.local_steps): each peer splits its round quota into "
        "this many inner AdamW steps, then the swarm averages the pseudo-gradient (start - end adapter) and every peer "
        "applies one outer Nesterov step to the round's start adapter. 1 = averaged gradient, one AdamW step per round")
    outer_lr: float = Field(0.7, gt=0, le=10, description="local-steps mode: learning rate of the outer Nesterov SGD step")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="local-steps mode: momentum of the outer Nesterov SGD step")
    lora_factor: Literal["both", "alternate"] = Field(
        "both", description="local-steps mode: which LoRA factors train in an outer round. both: A and B (their averages "
        "differ from the average of the products B.A by a second-order term); alternate: only B in odd rounds, only A in "
        "even ones (RoLoRA), so the averaged update of B.A is exact")

    @model_validator(mode="after")
    def _local(self) -> "TrainConfig":
        if self.lora_factor != "both" and self.local_steps == 1:
            raise ValueError("train.lora_factor alternate is for local-steps mode: set train.local_steps > 1")
        return self


class DataConfig(_Strict):
    """The training text."""

    source: str = Field(
        "pydoc",
        description="'pydoc' = the documentation text that ships with every CPython (pydoc_data.topics), "
        "or a path to a UTF-8 text file",
    )
    format: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto", description="how to read a local source: auto (by suffix; a directory is parquet), plain UTF-8 text, "
        "JSONL with text / prompt+completion / messages, or parquet (a file or a datasets.save_to_disk directory)")
    packing: Literal["pack", "pad"] = Field(
        "pack", description="pack: examples concatenated and cut into windows; pad: one example per window")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="content hash of the local source; a peer's copy must match")
    private: bool = Field(
        False, description="federated: each peer trains on its own local data (--data), which no other peer sees; "
        "no hash is shared, advertised or part of the fingerprint, and metrics rows say data_private: true")
    eval_fraction: float = Field(
        0.0, ge=0.0, le=0.5, description="held-out split: this fraction of the examples (of the tokens, for one plain "
        "text), chosen by a fixed rule the same on every peer, never trained on (swarm.evaluation.holdout)")
    eval_every: int = Field(
        0, ge=0, description="every this many rounds (0 = never) the round's peers evaluate the shared adapter on the "
        "held-out split, each a shard, summed exactly: metrics rows gain eval_loss and eval_round")

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.eval_every and not self.eval_fraction:
            raise ValueError("data.eval_every needs a held-out split: set data.eval_fraction (e.g. 0.1)")
        if self.private and self.sha256 is not None:
            raise ValueError("private data has no shared hash: drop data.sha256")
        return self


class AveragingConfig(_Strict):
    """How peers meet to average."""

    matchmaking_time: float = Field(3.0, gt=0, description="seconds a peer looks for its group")
    allreduce_timeout: float = Field(30.0, gt=0, description="seconds an all-reduce may take before the round is abandoned")
    chunk_timeout: float = Field(
        5.0, gt=0, description="seconds a member may go without sending its next part in an all-reduce before it counts "
        "as failed (results from a reducer, and each chunk of a state download: twice this)")
    round_timeout: float = Field(120.0, gt=0, description="seconds to wait at the round barrier for missing peers")
    max_norm_ratio: float | None = Field(
        10.0, gt=1, description="reject a contribution whose gradient norm exceeds this multiple of the group's median "
        "(groups of 3 or more; None: only the clip bound train.max_grad_norm applies)")
    codec: Literal["exact", "int8"] = Field(
        "exact", description="how contributions travel (swarm.codec): exact = float64 fixed point, 8 bytes a value each "
        "way; int8 = int8 values with per-block power-of-two scales shared by the group and error feedback, int16 sums "
        "back (about a fifth of the bytes), still summed exactly so every peer applies the same bits. int8 needs "
        "--transport tcp. Every peer of a run uses the same codec (part of the fingerprint when not exact)")


class RunConfig(_Strict):
    """One training run: every peer of the run must agree on all of it."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="the run's name in the DHT")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    averaging: AveragingConfig = Field(default_factory=AveragingConfig)

    def fingerprint(self) -> str:
        """Hash of what must match across peers (model choice, adapter shape, optimizer, a non-default averaging
        codec; the dataset when named by hash)."""
        # the base precision is per peer (swarm.precision): the allowed list is not part of what must match
        local = {"local_steps", "outer_lr", "outer_momentum", "lora_factor"}
        agreed = self.model_dump(mode="json", exclude={"averaging": True, "data": True, "train": {"precisions", *local}})
        agreed["model"].pop("path", None)
        d = self.data
        if d.sha256 is not None:  # a named dataset: peers must train the same bytes, read the same way
            agreed["data"] = {"sha256": d.sha256, "format": d.format, "packing": d.packing}
        if d.private:  # each peer's own data, read the same way; its hash is nobody else's business
            agreed["data"] = {"private": True, "format": d.format, "packing": d.packing}
        if d.eval_fraction or d.eval_every:  # which examples are never trained on, and when the swarm evaluates
            agreed["eval"] = {"fraction": d.eval_fraction, "every": d.eval_every}
        t = self.train
        if t.local_steps != 1:  # local-steps mode (an H=1 run's fingerprint is what it was before the mode existed)
            agreed["local"] = {k: getattr(t, k) for k in sorted(local)}
        if self.averaging.codec != "exact":  # how peers sum must match (an exact run's fingerprint is what it was)
            agreed["codec"] = self.averaging.codec
        return hashlib.sha256(json.dumps(agreed, sort_keys=True).encode()).hexdigest()[:16]


def default_run() -> RunConfig:
    """The embedded default run: a small local model, pydoc text, no download."""
    return RunConfig()


def load_config(path: str | Path | None) -> RunConfig:
    """Load a run config from YAML; raise SwarmError with a one-line message on any problem."""
    if path is None:
        return default_run()
    p = Path(path)
    if not p.is_file():
        raise SwarmError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SwarmError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SwarmError(f"config {p} must be a mapping at the top level")
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise SwarmError(f"config {p}: {where}: {msg}") from None
    if cfg.model.path is not None:
        mp = Path(cfg.model.path).expanduser()
        if not mp.is_absolute():
            mp = (p.parent / mp).resolve() if not mp.exists() else mp.resolve()
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(mp)})})
    return cfg
