"""Swarm vs a plain peft + torch loop, measured side by side in one run on this machine.

Prints three figures:
  1. scaling: 2 peers (1 torch thread each) on 127.0.0.1, swarm tokens/s / (2 x plain loop tokens/s)
  2. compute path: this project's per-peer step (Backend.train + apply_update) / the plain peft
     loop, same model, micro-batch and threads, interleaved A/B to share any machine noise
  3. join latency: from launching a third peer into the running swarm to its first contributed round

Also printed: the machine's own ceiling, two plain loops in two processes at the same time
(1 thread each) / (2 x one plain loop alone): what any 2-process scheme can reach on this box.

Usage: python scripts/bench_scaling.py [--rounds 10] [--repeats 5] [--tokens-per-round N] [--output DIR]
                                      [--transport hivemind|tcp]   (the peers' transport; default hivemind)
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


PLAIN_CHILD = """
import sys, time, json
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from swarm.config import default_run
from swarm.data import corpus_tokens, sample_batches
from swarm.model import resolve_model_dir
sys.path.insert(0, {scripts!r})
from bench_scaling import plain_peft_loop
run = default_run(); d = resolve_model_dir(run.model)
b = sample_batches(corpus_tokens(run.data.source, d), run.train.seq_len, run.train.micro_batch * 8, run.train.micro_batch, 0, 0, 0)
print(json.dumps(plain_peft_loop(run, d, b, {steps})))
"""


def concurrent_plain(steps: int) -> list[float]:
    """Two plain loops in two processes at once: the machine's ceiling for two single-thread workers."""
    code = PLAIN_CHILD.format(root=str(ROOT), scripts=str(ROOT / "scripts"), steps=steps)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    return [float(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]


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
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: unwind, so child processes are stopped
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10, help="2-peer rounds to measure (after a warm-up round)")
    ap.add_argument("--tokens-per-round", type=int, default=None, help="override the default run's round size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", default=None)
    ap.add_argument("--transport", choices=("hivemind", "tcp"), default="hivemind", help="the peers' transport (swarm.join --transport)")
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
    pair = concurrent_plain(24)
    ceiling = sum(pair) / (2 * plain_tps)

    # 1. scaling: 2 peers, one thread each, same micro-batch
    out = Path(args.output or tempfile.mkdtemp(prefix="bench-scaling-"))
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    cfg = []
    if args.tokens_per_round:
        import yaml

        body = default_run().model_dump(mode="json")
        body["train"]["tokens_per_round"] = args.tokens_per_round
        (out / "run.yaml").write_text(yaml.safe_dump(body))
        cfg = ["--config", str(out / "run.yaml")]
    try:
        common = ["--max-rounds", str(args.rounds + 10), "--min-peers", "2", "--transport", args.transport, *cfg]
        procs.append(start_peer(out / "a", common))
        addrs = wait_addr(out / "a")
        procs.append(start_peer(out / "b", common + ["--initial-peers", *addrs]))
        # 3. join latency, measured while the two train: launch c once round 3 is done
        while len(read_metrics(out / "a" / "metrics.jsonl")) < args.rounds + 1:
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a peer exited early; see " + str(out))
            time.sleep(0.2)
        launched = time.time()
        procs.append(start_peer(out / "c", common + ["--initial-peers", *addrs]))
        for p in procs:
            p.wait(timeout=900)
        joined = read_metrics(out / "c" / "metrics.jsonl")
        join_seconds = joined[0]["time"] - launched if joined else float("nan")
        # scaling is measured over rounds 1..R+1 (2 peers, before c was launched): the span from the end of
        # round 1 (warm-up) to the end of round R+1 covers R rounds
        ma = [m for m in read_metrics(out / "a" / "metrics.jsonl")]
        two = [m for m in ma if m["group_size"] == 2 and m["round"] <= args.rounds + 1]
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
        "tokens_per_round": args.tokens_per_round or run.train.tokens_per_round,
        "two_plain_loops_at_once_tokens_per_s": [round(x, 1) for x in pair],
        "machine_ceiling_two_plain_at_once_over_2x_plain": round(ceiling, 3),
        "swarm_2peers_tokens_per_s": round(swarm_tps, 1),
        "scaling_ratio_swarm_over_2x_plain": round(swarm_tps / (2 * plain_tps), 3),
        "swarm_over_machine_ceiling": round(swarm_tps / sum(pair), 3),
        "join_to_first_contribution_s": round(join_seconds, 2),
        "rounds_measured": len(two) - 1,
        "transport": args.transport,
        "output": str(out),
    }
    print(json.dumps(result, indent=2))
    print(f"[{args.transport}] scaling (goal >= 0.9): {result['scaling_ratio_swarm_over_2x_plain']} (machine ceiling {result['machine_ceiling_two_plain_at_once_over_2x_plain']}, "
          f"swarm / ceiling {result['swarm_over_machine_ceiling']}); compute path (goal >= 0.95): "
          f"{result['compute_path_ratio']}; join (goal <= 15 s): {result['join_to_first_contribution_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
