"""Which run a peer trains: its own --config, a run named with --run, or the best fit among the swarm's runs.

Records come from the network and are untrusted: a run whose record names a model path, or data this peer
cannot supply from its own --data (checked against the run's content hash), is never adopted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from swarm import SwarmError
from swarm.config import RunConfig, default_run
from swarm.planner import RunOption, choose_run
from swarm.records import RunRecord

if TYPE_CHECKING:
    from swarm.precision import PrecisionSettings

RUN_RECORD_WAIT = 15.0  # a joiner waits this long for the swarm's run records (the creator may still be starting)


def resolve_run(*, config: RunConfig | None, name: str | None, data: Path | None, joining: bool, members, memory_bytes: int,
                backend: str, precision: "PrecisionSettings | None" = None, say) -> tuple[RunConfig, RunRecord | None]:
    """The run this peer trains and the swarm's record of it (None: this peer creates it).

    config: the peer's own --config; name: --run; data: --data; joining: it has initial peers; members: the
    swarm's records (swarm.membership); memory_bytes/backend: to pick the largest run that fits; say: log a line."""
    from swarm.datasets import local_data

    runs = wait_for_runs(members, name or (config.name if config is not None else None)) if joining else {}
    if config is not None:
        run = config.model_copy(update={"name": name}) if name else config
        return local_data(run, data, from_network=False), runs.get(run.name)
    if name:
        if name in runs:
            return run_from_record(runs[name], data), runs[name]
        if joining:
            have = ", ".join(sorted(runs)) or "none"
            raise SwarmError(f"the swarm has no run named {name!r} (runs: {have})")
        return local_data(default_run().model_copy(update={"name": name}), data, from_network=False), None
    if not runs:
        return local_data(default_run(), data, from_network=False), None
    safe = {k: r for k, r in runs.items() if not unadoptable(r, data)}
    for k in sorted(set(runs) - set(safe)):
        say(f"ignoring run {k!r}: {unadoptable(runs[k], data)}")
    if not safe:
        raise SwarmError(f"no run in the swarm can be joined as is ({unadoptable(runs[min(runs)], data)}): "
                         "pass --config with your own copy of the run, or --data")
    options = [RunOption(name=r.name, params=r.params, bytes_needed=bytes_needed(r, backend, precision, memory_bytes)) for r in safe.values()]
    choice = choose_run(options, memory_bytes)
    if choice.run is None:
        raise SwarmError(choice.reason)
    say(f"joining run {choice.run!r}: {choice.reason}")
    return run_from_record(safe[choice.run], data), safe[choice.run]


def wait_for_runs(members, wanted: str | None, wait: float | None = None) -> dict[str, RunRecord]:
    """The swarm's runs; a joiner waits a little for them (the swarm's first peer may still be loading)."""
    end = time.monotonic() + (RUN_RECORD_WAIT if wait is None else wait)
    while True:
        runs = members.runs()
        if (runs and (wanted is None or wanted in runs)) or time.monotonic() > end:
            return runs
        time.sleep(0.5)


def unadoptable(record: RunRecord, data: Path | None) -> str | None:
    """Why a peer with local dataset `data` cannot adopt `record` without a --config of its own, or None."""
    from swarm.datasets import network_paths

    cfg = record.config if isinstance(record.config, dict) else {}
    d = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    paths = network_paths(cfg)
    if any(p.startswith("model.") for p in paths) or (paths and not d.get("sha256")):
        return (f"its record names local paths ({', '.join(paths)}); this peer never opens a path taken from "
                "the network")
    if (paths or d.get("sha256") or d.get("private") is True) and data is None:
        return ("it trains on each peer's private data: pass --data PATH" if d.get("private") is True else
                f"it trains on dataset {str(d.get('sha256'))[:12]} ({d.get('format', 'auto')}): pass --data PATH")
    return None


def run_from_record(record: RunRecord, data: Path | None) -> RunConfig:
    """The run config a record carries, with data only from this peer's --data (checked against the hash)."""
    from swarm.datasets import local_data, network_paths

    if paths := [p for p in network_paths(record.config if isinstance(record.config, dict) else {})
                 if p.startswith("model.")]:
        raise SwarmError(f"run {record.name!r} in the swarm names local paths ({', '.join(paths)}); this peer never "
                         f"opens a path taken from the network: pass --config with your own copy of that run")
    try:
        run = RunConfig.model_validate(record.config)
    except Exception:
        raise SwarmError(f"run {record.name!r} in the swarm has a config this peer cannot read: pass --config") from None
    return local_data(run, data, from_network=True)


def bytes_needed(record: RunRecord, backend: str, precision: "PrecisionSettings | None" = None, memory_bytes: int = 0) -> int:
    """Memory to train the record's run at micro-batch 1: with this peer's precision request, in the most precise
    option the run allows that fits `memory_bytes` (else the most compact one: swarm.precision.fit); fp32 without
    one. A record that cannot be sized, or whose allowed precisions this peer cannot run, is never picked."""
    from swarm.memory import ModelShape, estimate
    from swarm.precision import fit

    try:
        run = RunConfig.model_validate(record.config)
        shape = ModelShape.from_config(record.model_config_json)
        if precision is not None:
            return fit(precision, run, shape, memory_bytes).needed_bytes
        return estimate(shape, "lora", lora_r=run.lora.r, lora_targets=run.lora.target_modules, micro_batch=1,
                        seq_len=run.train.seq_len, dtype="float32", backend=backend).total
    except Exception:
        return 1 << 62
