"""Swarm vs a plain peft + torch loop, measured side by side in one run on this machine.

Prints three figures:
  1. scaling: 2 peers (1 torch thread each) on 127.0.0.1, swarm tokens/s / (2 x plain loop tokens/s)
  2. compute path: this project's per-peer step (Backend.train + apply_update) / the plain peft
     loop, same model, micro-batch and threads, interleaved A/B to share any machine noise
  3. join latency: from launching a third peer into the running swarm to its first contributed round

Usage: python scripts/bench_scaling.py [--rounds 12] [--repeats 5] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarm.metrics import read_metrics  # noqa: E402


def plain_peft_loop(run, model_dir, batches, steps: int) -> float:
    """The textbook loop: model(ids, labels).loss.backward(); AdamW step. Tokens/s."""
    import torch

    from swarm.backends.torch_lora import load_peft_model

    model = load_peft_model(run, model_dir)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.train.lr)
    model.train()
    tokens, seconds = 0, 0.0
    for i in range(steps + 1):
        b = torch.from_numpy(batches[i % len(batches)])
        t0 = time.perf_counter()
        out = model(input_ids=b[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), b[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            seconds += time.perf_counter() - t0
            tokens += b[:, 1:].numel()
    return tokens / seconds


def swarm_compute_path(run, model_dir, batches, steps: int) -> float:
    from swarm.backends import load_backend

    backend = load_backend("torch", run=run, model_dir=model_dir, threads=1)
    tokens, seconds = 0, 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        res = backend.train([batches[i % len(batches)]])
        backend.apply_update(res.grads)
        if i:
            seconds += time.perf_counter() - t0
            tokens += res.tokens
    return tokens / seconds


def start_peer(out: Path, extra: list[str], log_name="log.txt") -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "swarm.join", "--host", "127.0.0.1", "--threads", "1", "--output", str(out), *extra]
    return subprocess.Popen(cmd, stdout=open(out / log_name, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_addr(out: Path, timeout=120) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in (out / "log.txt").read_text().splitlines():
            if line.startswith("initial peers:"):
                return line.split(":", 1)[1].split()
        time.sleep(0.2)
    raise SystemExit("first peer did not start")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from swarm.config import default_run
    from swarm.data import corpus_tokens, sample_batches
    from swarm.model import resolve_model_dir

    run = default_run()
    model_dir = resolve_model_dir(run.model)
    toks = corpus_tokens(run.data.source, model_dir)
    mb = run.train.micro_batch
    batches = sample_batches(toks, run.train.seq_len, mb * 8, mb, 0, 0, 0)

    # 2. compute path vs plain loop, interleaved
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(plain_peft_loop(run, model_dir, batches, 8))
        ours.append(swarm_compute_path(run, model_dir, batches, 8))
    plain_tps = sorted(plain)[len(plain) // 2]
    ours_tps = sorted(ours)[len(ours) // 2]

    # 1. scaling: 2 peers, one thread each, same micro-batch
    out = Path(args.output or tempfile.mkdtemp(prefix="bench-scaling-"))
    procs = []
    try:
        common = ["--max-rounds", str(args.rounds), "--min-peers", "2"]
        procs.append(start_peer(out / "a", common))
        addrs = wait_addr(out / "a")
        procs.append(start_peer(out / "b", common + ["--initial-peers", *addrs]))
        # 3. join latency, measured while the two train: launch c once round 3 is done
        while len(read_metrics(out / "a" / "metrics.jsonl")) < 3:
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a peer exited early; see " + str(out))
            time.sleep(0.2)
        launched = time.time()
        procs.append(start_peer(out / "c", common + ["--initial-peers", *addrs]))
        for p in procs:
            p.wait(timeout=900)
        joined = read_metrics(out / "c" / "metrics.jsonl")
        join_seconds = joined[0]["time"] - launched if joined else float("nan")
        # scaling is measured over the rounds before c joined (2 peers), skipping round 1 (warm-up)
        ma = [m for m in read_metrics(out / "a" / "metrics.jsonl")]
        two = [m for m in ma if m["group_size"] == 2 and m["round"] >= 2]
        if len(two) < 2:
            raise SystemExit("too few 2-peer rounds to measure; raise --rounds")
        span = two[-1]["time"] - two[0]["time"]
        group_tokens = sum(m["group_tokens"] for m in two[1:])
        swarm_tps = group_tokens / span
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    result = {
        "plain_peft_tokens_per_s_1thread": round(plain_tps, 1),
        "swarm_compute_path_tokens_per_s_1thread": round(ours_tps, 1),
        "compute_path_ratio": round(ours_tps / plain_tps, 3),
        "swarm_2peers_tokens_per_s": round(swarm_tps, 1),
        "scaling_ratio_swarm_over_2x_plain": round(swarm_tps / (2 * plain_tps), 3),
        "join_to_first_contribution_s": round(join_seconds, 2),
        "rounds_measured": len(two) - 1,
        "output": str(out),
    }
    print(json.dumps(result, indent=2))
    print(f"scaling (goal >= 0.9): {result['scaling_ratio_swarm_over_2x_plain']}; compute path (goal >= 0.95): "
          f"{result['compute_path_ratio']}; join (goal <= 15 s): {result['join_to_first_contribution_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
