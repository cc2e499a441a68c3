"""Local-steps mode (DiLoCo) vs exact synchronous averaging, side by side in one run on 127.0.0.1.

Every mode trains the same token budget (R rounds x T tokens) with a real testbed of N peers:
  sync  : train.local_steps 1, T tokens per round, R rounds (one averaged AdamW step per round)
  H=h   : train.local_steps h, h*T tokens per round, R/h outer rounds (each inner step trains T/N tokens per peer,
          as a sync round's step does), so a round sends the same bytes for h times the tokens
Printed per mode: averaging bytes sent per trained token (metrics bytes_sent summed over peers and rounds / the
swarm's tokens), its ratio to sync (goal <= 0.02 with enough H), the held-out loss of the final adapter (the same
held-out windows for every mode, never trained on) and its ratio to sync (goal <= 1.02).

Then the A.B problem, in process: from the sync run's final adapter, N peers each take H inner steps on their own
data; || mean(B_i A_i) - mean(B_i) mean(A_i) || relative to || mean(B_i A_i) - B_0 A_0 || for lora_factor both,
and for alternate (0 by construction: one factor stays shared).

Usage: python scripts/bench_local_steps.py [--peers 2] [--rounds 24] [--tokens-per-round 2048] [--local-steps 4,8]
       [--factor both] [--config configs/tiny.yaml] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from swarm.metrics import read_metrics  # noqa: E402

EVAL_FRACTION = 0.1
EVAL_WINDOWS = 128


def mode_config(base: dict, h: int, tokens: int, factor: str, name: str) -> dict:
    run = json.loads(json.dumps(base))
    run["name"] = name
    run.setdefault("train", {}).update(tokens_per_round=tokens * h, local_steps=h)
    if h > 1:
        run["train"]["lora_factor"] = factor
    run.setdefault("data", {})["eval_fraction"] = EVAL_FRACTION  # held out from training in every mode
    run.setdefault("averaging", {})["matchmaking_time"] = 1.0
    return run


def run_testbed(out: Path, config: dict, peers: int, rounds: int, timeout: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "swarm.testbed", "--peers", str(peers), "--max-rounds", str(rounds),
                          "--config", str(path), "--output", str(out / "bed"), "--uniform", "--timeout", str(timeout)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        log, _ = p.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        log, _ = p.communicate()
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"testbed for {config['name']} failed ({p.returncode}):\n{log[-3000:]}")
    rows = [read_metrics(out / "bed" / f"peer{k}" / "metrics.jsonl") for k in range(peers)]
    by_round: dict[int, dict] = {}  # a peer that caught up by download has no row for the rounds it skipped
    for peer in rows:
        for r in peer:
            by_round.setdefault(r["round"], {"tokens": r["group_tokens"], "hashes": set()})["hashes"].add(r["adapter_sha256"])
    tokens = sum(r["tokens"] for r in by_round.values())
    sent = sum(r["bytes_sent"] for peer in rows for r in peer)
    return {"tokens": tokens, "bytes_per_token": sent / tokens, "rounds": len(by_round), "wall": wall,
            "identical": all(len(r["hashes"]) == 1 for r in by_round.values()),
            "checkpoint": out / "bed" / "peer0" / "checkpoint"}


def held_out_loss(config: dict, checkpoint: Path) -> float:
    from swarm import checkpoint as ck
    from swarm.backends import load_backend
    from swarm.config import RunConfig
    from swarm.datasets import load_run_data
    from swarm.model import resolve_model_dir

    run = RunConfig.model_validate(config)
    model_dir = resolve_model_dir(run.model)
    backend = load_backend("torch", run=run, model_dir=model_dir, threads=2, seed=0)
    shapes = {n: a.shape for n, a in backend.get_adapter().items()}
    state = ck.load(checkpoint, shapes, run.fingerprint())
    backend.set_adapter(state.adapter)
    held = load_run_data(run.data, model_dir, run.train.seq_len).held_out
    windows = held.ids[np.unique(np.linspace(0, len(held.ids) - 1, EVAL_WINDOWS).astype(int))]  # spread over the split
    return float(backend.eval_loss([windows[i:i + 8] for i in range(0, len(windows), 8)]))


def ab_problem(config: dict, checkpoint: Path, peers: int, steps: list[int]) -> list[tuple[int, str, float]]:
    """Each of `peers` takes H inner steps from the same start on its own data; how far averaging A and B is from
    averaging B.A."""
    from swarm import checkpoint as ck
    from swarm.backends import load_backend
    from swarm.backends.base import OptimizerState
    from swarm.config import RunConfig
    from swarm.data import sample_batches
    from swarm.datasets import load_run_data
    from swarm.local_steps import LocalSteps, ab_mismatch
    from swarm.model import resolve_model_dir

    out = []
    for h in steps:
        for factor in ("both", "alternate"):
            t = config["train"]  # the sync run's: each inner step trains its round's tokens
            run = RunConfig.model_validate({**config, "train": {**t, "local_steps": h, "lora_factor": factor,
                                                                "tokens_per_round": t["tokens_per_round"] * h}})
            model_dir = resolve_model_dir(run.model)
            backend = load_backend("torch", run=run, model_dir=model_dir, threads=2, seed=0)
            names = backend.adapter_names()
            shapes = {n: tuple(a.shape) for n, a in backend.get_adapter().items()}
            start = ck.load(checkpoint, shapes, RunConfig.model_validate(config).fingerprint()).adapter
            tokens = load_run_data(run.data, model_dir, run.train.seq_len).tokens
            t = run.train
            seqs = t.tokens_per_round // t.seq_len // peers
            local = LocalSteps(t, names, shapes)
            ends = []
            for i in range(peers):
                backend.set_optimizer(OptimizerState(step=0))
                batches = sample_batches(tokens, t.seq_len, seqs, t.micro_batch, 1234, 1, i + 1)
                local.train(backend, batches, len(batches), 1, start)  # outer round 1: alternate trains B only
                ends.append(backend.get_adapter())
            out.append((h, factor, ab_mismatch(start, ends)))
    return out


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: unwind, so child processes are stopped
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=24, help="sync rounds (the token budget is rounds x tokens-per-round)")
    ap.add_argument("--tokens-per-round", type=int, default=2048, help="T: the sync round's tokens")
    ap.add_argument("--local-steps", default="4,8", help="comma list of H (each must divide --rounds)")
    ap.add_argument("--factor", default="both", choices=["both", "alternate"], help="train.lora_factor of the H runs")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--timeout", type=float, default=300.0, help="per testbed run")
    ap.add_argument("--output", default=None)
    a = ap.parse_args()
    steps = [int(h) for h in a.local_steps.split(",")]
    if any(h < 2 or a.rounds % h for h in steps):
        ap.error("every --local-steps H must be >= 2 and divide --rounds")
    base = yaml.safe_load(Path(a.config).read_text())
    out = Path(a.output or tempfile.mkdtemp(prefix="bench-local-"))
    print(f"{a.peers} peers, budget {a.rounds} x {a.tokens_per_round} = {a.rounds * a.tokens_per_round} tokens, "
          f"config {a.config}, output {out}", flush=True)
    results = {}
    for h in [1, *steps]:
        cfg = mode_config(base, h, a.tokens_per_round, a.factor, f"bench-local-h{h}")
        res = run_testbed(out / f"h{h}", cfg, a.peers, a.rounds // h, a.timeout)
        res["loss"] = held_out_loss(cfg, res["checkpoint"])
        results[h] = (cfg, res)
        print(f"  {'sync' if h == 1 else f'H={h}':>6}: {res['rounds']:3d} rounds, {res['tokens']} tokens, "
              f"{res['wall']:.0f}s, identical={res['identical']}", flush=True)
    sync = results[1][1]
    print(f"\n{'mode':>8} {'bytes/token':>12} {'÷ sync':>8} {'held-out loss':>14} {'÷ sync':>8}")
    for h, (_, r) in results.items():
        print(f"{'sync' if h == 1 else f'H={h}':>8} {r['bytes_per_token']:12.2f} {r['bytes_per_token'] / sync['bytes_per_token']:8.4f}"
              f" {r['loss']:14.4f} {r['loss'] / sync['loss']:8.4f}")
    print("\nA.B problem (from the sync run's final adapter, one outer round of H inner steps per peer):")
    print(f"{'H':>4} {'factor':>10} {'||mean(BA) - mean(B)mean(A)|| / ||mean(BA) - B0A0||':>52}")
    for h, factor, err in ab_problem(results[1][0], sync["checkpoint"], a.peers, steps):
        print(f"{h:4d} {factor:>10} {err:52.5f}")
    return 0 if all(r["identical"] for _, r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
