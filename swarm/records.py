"""Versioned wire records. Everything here arrives from other peers: untrusted input.

Records are strict on types (no coercion: "12" is not a number), reject absurd values, reject an
unknown version, and ignore unknown fields of a known version (a newer peer may add fields).
`parse_*` functions are the only way a record from the network reaches the rest of the code.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from swarm import SwarmError

ADVERT_VERSION = 1
TB = 1 << 40
MAX_TIME = 1e11  # seconds since the epoch (year ~5000): a larger DHT time is absurd
_CONTROL = {chr(c) for c in range(32)} | {chr(127)}


def _printable(v: str) -> str:
    """Strings from other peers end up in terminals (status tables): no control characters."""
    if any(ch in _CONTROL for ch in v):
        raise ValueError("must not contain control characters")
    return v


class RecordError(SwarmError):
    """A record from the network failed validation."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack-safe dict (str/int/float/bool/None/list/dict only)."""
        return self.model_dump(mode="json")


class CapabilityAdvert(_Wire):
    """What a peer says about itself, under its run, in the DHT (refreshed, with expiry)."""

    version: Literal[1] = ADVERT_VERSION
    peer_id: str = Field(min_length=1, max_length=128)
    run: str = Field(min_length=1, max_length=64)
    backend: Literal["cuda", "rocm", "mps", "mlx", "cpu"]
    device: str = Field(max_length=200)
    tier: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$", description="swarm.hardware tier name, e.g. 'sweet-spot'")
    memory_total_bytes: int = Field(ge=0, le=64 * TB)
    memory_usable_bytes: int = Field(ge=0, le=64 * TB)
    throughput_tokens_per_s: float = Field(ge=0.0, le=1e9, description="measured LoRA-step throughput on the run's model")
    max_utilization: float = Field(1.0, gt=0.0, le=1.0)
    max_micro_batch: int = Field(ge=0, le=1 << 20, description="largest micro-batch that fits this peer's memory for the run")
    start_round: int = Field(0, ge=0, le=1 << 53, description="first global round this peer contributes to")
    paused: bool = False
    loading: bool = Field(False, description="connected, still loading its model: not plannable yet, but round 1 waits for it")
    training_round: int = Field(0, ge=0, le=1 << 53, description="round this peer is training now (0: none yet)")
    plan_id: str = Field("", max_length=64, description="plan of the round it is training (planner.RoundPlan.plan_id)")
    timestamp: float = Field(ge=0.0, le=MAX_TIME, description="sender's DHT time when the advert was written")
    precision: str = Field("fp32", pattern=r"^[a-z0-9]{1,8}$", description="base precision it trains in (swarm.precision)")
    precisions: list[str] = Field(["fp32"], max_length=8, description="base precisions its platform can run")
    checkpointing: bool = Field(False, description="whether it trains with gradient checkpointing")
    memory_needed_bytes: int = Field(0, ge=0, le=64 * TB, description="what micro-batch 1 needs in its precision (0: not said)")

    @field_validator("precisions")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:  # names a newer peer adds are kept, not refused
        if any(not (isinstance(p, str) and 0 < len(p) <= 8 and p.isalnum()) for p in v):
            raise ValueError("precision names must be short alphanumeric strings")
        return v

    @field_validator("peer_id", "run", "device")
    @classmethod
    def _no_control(cls, v: str) -> str:
        return _printable(v)

    @field_validator("throughput_tokens_per_s", "max_utilization", "timestamp")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @field_validator("memory_usable_bytes")
    @classmethod
    def _usable_le_total(cls, v: int, info) -> int:
        total = info.data.get("memory_total_bytes")
        if total is not None and v > total:
            raise ValueError("usable memory exceeds total memory")
        return v


def _parse(model: type[_Wire], raw: Any, what: str, version: int) -> Any:
    if not isinstance(raw, dict):
        raise RecordError(f"{what}: expected a mapping, got {type(raw).__name__}")
    if type(raw.get("version")) is not int or raw["version"] != version:  # True and 1.0 are not 1
        raise RecordError(f"{what}: unsupported version {raw.get('version')!r} (this peer speaks {version})")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecordError(f"{what}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def parse_advert(raw: Any) -> CapabilityAdvert:
    """Validate a capability advert from the network; RecordError if it is anything but sound."""
    return _parse(CapabilityAdvert, raw, "capability advert", ADVERT_VERSION)


# --- run and progress records (written by the swarm loop) -----------------------------------
RUN_VERSION = 1
PROGRESS_VERSION = 1


class RunRecord(_Wire):
    """A run in the DHT: what a peer must match to join it, and what it needs to pick it."""

    version: Literal[1] = RUN_VERSION
    name: str = Field(min_length=1, max_length=64)
    protocol: int = Field(ge=0, le=1 << 16)
    fingerprint: str = Field(min_length=1, max_length=64, description="hash of model choice, LoRA and optimizer settings")
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model: str = Field(max_length=300, description="human-readable model name")
    params: int = Field(ge=0, le=1 << 50, description="base model parameter count")
    config: dict = Field(description="the run config (JSON), so a joiner without the YAML can rebuild it")
    model_config_json: dict = Field(default_factory=dict, description="the base model's config.json (its shape, for memory estimates)")
    created: float = Field(ge=0.0)
    transport: str = Field("hivemind", min_length=1, max_length=16,
                           description="the swarm's --transport (records of older peers, which lack it: hivemind)")


class ProgressRecord(_Wire):
    """A peer's latest completed round: for joiners, the status table, and agreement checks."""

    version: Literal[1] = PROGRESS_VERSION
    peer_id: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=0, le=1 << 40)
    adapter_sha256: str = Field(max_length=64)
    loss: float | None = None
    tokens_per_s: float = Field(0.0, ge=0.0, le=1e12)
    quota_tokens: int = Field(0, ge=0, le=1 << 40)
    micro_batch: int = Field(0, ge=0, le=1 << 20)
    plan_id: str = Field("", max_length=64)
    state: Literal["training", "paused", "leaving"] = "training"
    backend: str = Field("torch", max_length=16, description="framework: adapters agree bit for bit only within one")
    history: dict[str, str] = Field(default_factory=dict, description="recent rounds -> state sha256 (adapter, optimizer, lineage: agreement checks)")
    lineage: str = Field("", max_length=64, description="lineage of this peer's state (checkpoint.TrainingState.lineage)")
    work: int = Field(0, ge=0, le=1 << 62, description="tokens trained in rounds 1..round on this peer's chain")
    lineages: dict[str, str] = Field(default_factory=dict, description="recent rounds -> lineage (fork checks, any framework)")
    timestamp: float = Field(ge=0.0)

    @field_validator("history", "lineages")
    @classmethod
    def _short_history(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 16 or any(not k.isdigit() or len(k) > 12 or len(h) > 64 for k, h in v.items()):
            raise ValueError("history must map at most 16 round numbers to hashes")
        return v

    @field_validator("loss", "tokens_per_s", "timestamp")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be finite")
        return v


def parse_run(raw: Any) -> RunRecord:
    return _parse(RunRecord, raw, "run record", RUN_VERSION)


def parse_progress(raw: Any) -> ProgressRecord:
    return _parse(ProgressRecord, raw, "progress record", PROGRESS_VERSION)
