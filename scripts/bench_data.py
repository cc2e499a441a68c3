"""Instruction data and held-out evaluation, side by side in one run.

usage: python scripts/bench_data.py [--rounds 8] [--examples 400] [--steps 8] [--skip-swarm]

The dataset is written here: short "spell the word" instructions as JSONL prompt/completion records
(loss on the completions only); 20 % of them are held out (data.eval_fraction) and evaluated every
round (data.eval_every 1).

(a) swarm ÷ single process: a 3-peer swarm (`python -m swarm.testbed`, real processes on 127.0.0.1,
configs/tiny.yaml's model) trains `--rounds` rounds and records eval_loss each round. One process then
replays the same global batches — every member's windows of every round (`swarm.datasets.shard_batches`
with the plan read back from the peers' metrics) — as one batch per round: the mean gradient over all
their tokens, clipped once, one AdamW step — and evaluates the same held-out windows. Printed per
round: both eval losses and their ratio (goal: within 1 %).
(b) eval loss falling over rounds: the swarm's column of (a), and last ÷ first.
(c) tokens/s with loss masking and packing vs plain text: the default builtin model trains `--steps`
micro-batches of the same examples as masked packed windows, masked padded windows, and as one plain
text (every token carries loss), interleaved, best of 3; printed: window tokens/s, loss-carrying
tokens/s (what the swarm's average is weighted by), and window tokens/s ÷ plain text's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ["apple", "river", "stone", "cloud", "green", "light", "table", "music", "ocean", "plant",
         "house", "bread", "chair", "dream", "flame", "grape", "heart", "lemon", "mouse", "night"]


def write_dataset(path: Path, n: int) -> None:
    rows = [{"prompt": f"Spell {w}{i}:", "completion": " " + " ".join(f"{w}{i}")}
            for i in range(n // len(WORDS) + 1) for w in WORDS][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_config(path: Path, data: Path, seq_len: int) -> None:
    from swarm.datasets import file_sha256

    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    path.write_text(yaml.safe_dump({
        "name": "benchdata", "model": tiny["model"], "lora": tiny["lora"],
        "train": {"seq_len": seq_len, "micro_batch": 8, "tokens_per_round": 3 * 16 * seq_len, "lr": 0.01},
        "data": {"source": str(data), "sha256": file_sha256(data), "format": "jsonl", "packing": "pack",
                 "eval_fraction": 0.2, "eval_every": 1}}))


def run_swarm(cfg: Path, data: Path, out: Path, rounds: int) -> dict[int, list[dict]]:
    from swarm.metrics import read_metrics

    cmd = [sys.executable, "-m", "swarm.testbed", "--peers", "3", "--max-rounds", str(rounds), "--config", str(cfg),
           "--data", str(data), "--output", str(out), "--threads", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        sys.exit(f"testbed failed ({res.returncode}): {res.stdout[-2000:]}{res.stderr[-2000:]}")
    by_round: dict[int, list[dict]] = {}
    for k in range(3):
        for r in read_metrics(out / f"peer{k}" / "metrics.jsonl"):
            by_round.setdefault(r["round"], []).append(r)
    return by_round


def eval_of(backend, held, mb: int = 16) -> float:
    from swarm.backends.base import Batch

    return backend.eval_loss([Batch(held.ids[i:i + mb], held.loss_mask[i:i + mb]) for i in range(0, len(held.ids), mb)])


def single_process(cfg: Path, by_round: dict[int, list[dict]], rounds: int, final: Path) -> tuple[list[float], float]:
    """Eval loss after rounds 0..rounds of one process trained on the swarm's global batches; and the eval
    loss of the swarm's final adapter (`final`: a peer's peft adapter directory) on the same windows."""
    from swarm.averaging import clip_by_norm, flatten, unflatten
    from swarm.backends import load_backend
    from swarm.backends.base import Batch
    from swarm.config import load_config
    from swarm.datasets import load_run_data, shard_batches
    from swarm.model import resolve_model_dir

    run = load_config(cfg)
    model_dir = resolve_model_dir(run.model)
    data = load_run_data(run.data, model_dir, run.train.seq_len)
    backend = load_backend("torch", run=run, model_dir=model_dir, threads=1, seed=0)
    names = backend.adapter_names()
    shapes = {n: a.shape for n, a in backend.get_adapter().items()}
    out = [eval_of(backend, data.held_out)]
    for rnd in range(1, rounds + 1):
        rows = sorted(by_round[rnd], key=lambda r: r["peer"])
        if len(rows) != 3 or any(r["group_size"] != 3 for r in rows):
            sys.exit(f"round {rnd}: not every peer was in the group; rerun")
        plan = NS(peer_ids=tuple(r["peer"] for r in rows),
                  tasks=tuple(NS(peer_id=r["peer"], sequences=r["quota_tokens"] // run.train.seq_len,
                                 micro_batch=r["micro_batch"]) for r in rows))
        batches: list[Batch] = []
        for r in rows:
            mine = shard_batches(data.windows, plan, r["peer"], seed=0, round_=rnd)
            done = np.cumsum([int(b.loss_mask.sum()) for b in mine]).tolist()  # a peer cut short trained a prefix
            batches += mine[:done.index(r["tokens"]) + 1]
        res = backend.train(batches)
        assert res.tokens == sum(r["tokens"] for r in rows), (res.tokens, [r["tokens"] for r in rows])
        g, _ = clip_by_norm(flatten(res.grads, names), run.train.max_grad_norm)
        backend.apply_update(unflatten(g, names, shapes))
        out.append(eval_of(backend, data.held_out))
    from swarm.adapters import load_peft_adapter

    backend.set_adapter(load_peft_adapter(final))
    return out, eval_of(backend, data.held_out)


def throughput(work: Path, n_examples: int, steps: int, reps: int = 3) -> list[tuple[str, float, float]]:
    """(variant, window tokens/s, loss tokens/s) on the default builtin model, best of `reps`."""
    from swarm.backends import load_backend
    from swarm.config import default_run
    from swarm.data import corpus_tokens, sample_batches
    from swarm.datasets import load_windows, read_examples, sample_windows
    from swarm.model import resolve_model_dir

    run = default_run()
    model_dir = resolve_model_dir(run.model)
    seq, mb = run.train.seq_len, run.train.micro_batch
    data = work / "tp.jsonl"
    write_dataset(data, n_examples)
    plain = work / "tp.txt"
    plain.write_text("\n".join(s for ex in read_examples(data) for s, _ in ex.segments))
    backend = load_backend("torch", run=run, model_dir=model_dir, threads=1, seed=0)
    variants = {"plain text": sample_batches(corpus_tokens(str(plain), model_dir), seq, mb * steps, mb, 0, 1, 1)}
    for packing in ("pack", "pad"):
        w, _ = load_windows(str(data), "jsonl", packing, None, model_dir, seq)
        variants[f"masked, {packing}"] = sample_windows(w, mb * steps, mb, 0, 1, 1)
    best: dict[str, tuple[float, float]] = {}
    for name, batches in variants.items():
        backend.train(batches[:1])  # warm-up
    for _ in range(reps):  # variants interleaved, best of `reps`: other load on the machine hits them alike
        for name, batches in variants.items():
            t0 = time.perf_counter()
            res = backend.train(batches)
            sec = time.perf_counter() - t0
            window_tokens = sum((b.ids if hasattr(b, "ids") else b)[:, 1:].size for b in batches)
            if name not in best or window_tokens / sec > best[name][0]:
                best[name] = (window_tokens / sec, res.tokens / sec)
    return [(name, *best[name]) for name in variants]


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: unwind, so child processes are stopped
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="micro-batches per throughput variant")
    p.add_argument("--skip-swarm", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        if not a.skip_swarm:
            data, cfg = work / "instr.jsonl", work / "run.yaml"
            write_dataset(data, a.examples)
            write_config(cfg, data, a.seq_len)
            t0 = time.perf_counter()
            by_round = run_swarm(cfg, data, work / "bed", a.rounds)
            print(f"(a, b) 3-peer swarm, {a.rounds} rounds, {a.examples} examples (20 % held out): "
                  f"{time.perf_counter() - t0:.0f}s")
            swarm_eval = {}
            for rows in by_round.values():
                for r in rows:
                    if "eval_loss" in r:
                        swarm_eval.setdefault(r["eval_round"], set()).add(r["eval_loss"])
            if any(len(v) != 1 for v in swarm_eval.values()):
                sys.exit(f"peers recorded different eval losses: {swarm_eval}")
            single, final = single_process(cfg, by_round, a.rounds, work / "bed" / "peer0" / "adapter")
            print(f"{'after round':>11} {'swarm eval':>11} {'single eval':>12} {'swarm/single':>13}")
            for r in sorted(swarm_eval):
                s = next(iter(swarm_eval[r]))
                print(f"{r:>11} {s:>11.6f} {single[r]:>12.6f} {s / single[r]:>13.6f}")
            print(f"{a.rounds:>11} {final:>11.6f} {single[a.rounds]:>12.6f} {final / single[a.rounds]:>13.6f}"
                  "  (the swarm's final adapter, evaluated here)")
            last = max(swarm_eval)
            first_s, last_s = next(iter(swarm_eval[0])), next(iter(swarm_eval[last]))
            ratio = final / single[a.rounds]
            print(f"(a) eval loss after round {a.rounds}: swarm ÷ single process = {ratio:.6f} "
                  f"(goal within 1 %: {'yes' if abs(ratio - 1) <= 0.01 else 'NO'})")
            print(f"(b) swarm eval loss round {last} ÷ round 0 = {last_s / first_s:.4f} (falling: "
                  f"{'yes' if all(next(iter(swarm_eval[r])) > next(iter(swarm_eval[r + 1])) for r in range(last)) else 'not every round'})")
        tp = throughput(work, a.examples, a.steps)
        base = tp[0][1]
        print(f"(c) {'variant':<14} {'tokens/s':>9} {'loss tok/s':>11} {'tokens/s ÷ plain':>17}")
        for name, w, l in tp:
            print(f"    {name:<14} {w:>9.0f} {l:>11.0f} {w / base:>17.3f}")


if __name__ == "__main__":
    main()
