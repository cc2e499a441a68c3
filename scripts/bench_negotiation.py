"""Negotiated vs uniform task sizes, side by side in one run.

Two peers on 127.0.0.1 (1 torch thread each): one at full speed, one at --max-utilization 0.5.
The same number of rounds (so the same total tokens) is trained twice: with the speed-negotiated
plan and with uniform task sizes (--uniform). Prints, for each:
  - straggler idle fraction: time peers spend waiting at the round barrier for the group's last member
    (from the arrival times every member shares in the all-reduce) / wall time; the fraction spent in
    averaging as a whole (barrier + transfer) is printed too
  - swarm tokens/s
and the ratios. The ideal for this pair is 1.5x (speeds 1 : 0.5).

Usage: python scripts/bench_negotiation.py [--rounds 12] [--tokens-per-round N] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarm.metrics import read_metrics  # noqa: E402


def run_bed(out: Path, rounds: int, uniform: bool, config: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "swarm.testbed", "--peers", "2", "--max-utilization", "1,0.5", "--threads", "1",
           "--max-rounds", str(rounds), "--output", str(out)] + (["--uniform"] if uniform else [])
    if config is not None:
        cmd += ["--config", str(config)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"testbed failed ({'uniform' if uniform else 'negotiated'}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    per_peer = [read_metrics(out / f"peer{k}" / "metrics.jsonl") for k in range(2)]
    skip = 2  # rounds 1-2: throughput estimates settle (the first plan uses the cached probe)
    rows = [[m for m in ms if m["round"] > skip] for ms in per_peer]
    wall = sum(m["seconds"] for m in rows[0])
    # idle = waiting for the group's last member (barrier); the all-reduce's own transfer is reported apart
    idle = sum(m["barrier_wait_seconds"] for ms in rows for m in ms) / sum(m["seconds"] for ms in rows for m in ms)
    in_averaging = sum(m["wait_seconds"] for ms in rows for m in ms) / sum(m["seconds"] for ms in rows for m in ms)
    tokens = sum(m["group_tokens"] for m in rows[0])
    return {"idle_fraction": idle, "averaging_fraction": in_averaging, "tokens_per_s": tokens / wall, "rounds": len(rows[0]),
            "quotas": [ms[-1]["quota_tokens"] for ms in rows], "identical": len({ms[-1]["adapter_sha256"] for ms in rows}) == 1}


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: unwind, so child processes are stopped
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tokens-per-round", type=int, default=None, help="override the default run's round size")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    out = Path(args.output or tempfile.mkdtemp(prefix="bench-negotiation-"))
    out.mkdir(parents=True, exist_ok=True)
    config = None
    if args.tokens_per_round:
        import yaml

        from swarm.config import default_run

        body = default_run().model_dump(mode="json")
        body["train"]["tokens_per_round"] = args.tokens_per_round
        config = out / "run.yaml"
        config.write_text(yaml.safe_dump(body))
    neg = run_bed(out / "negotiated", args.rounds, uniform=False, config=config)
    uni = run_bed(out / "uniform", args.rounds, uniform=True, config=config)
    result = {
        "negotiated": neg, "uniform": uni,
        "tokens_per_round": args.tokens_per_round or 6144,
        "idle_negotiated": round(neg["idle_fraction"], 4), "idle_uniform": round(uni["idle_fraction"], 4),
        "idle_ratio_negotiated_over_uniform": round(neg["idle_fraction"] / max(uni["idle_fraction"], 1e-9), 3),
        "tokens_per_s_ratio_negotiated_over_uniform": round(neg["tokens_per_s"] / uni["tokens_per_s"], 3),
        "output": str(out),
    }
    print(json.dumps(result, indent=2))
    print(f"idle: negotiated {neg['idle_fraction']:.1%} vs uniform {uni['idle_fraction']:.1%} "
          f"(goal <= 5% and <= 0.2x uniform); tokens/s negotiated / uniform = "
          f"{result['tokens_per_s_ratio_negotiated_over_uniform']} (limit 1.5, goal >= 1.35)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
