"""Base precision side by side: memory, speed, and what a mixed-precision swarm learns.

usage: python scripts/bench_precision.py [--hidden 768] [--layers 12] [--steps 3] [--rounds 12] [--skip-swarm]

Part 1, one process per precision (fp32, bf16, nf4 when bitsandbytes is installed), each fresh so its
peak RSS is its own: the real trainer (`swarm.backends.torch_lora.TorchLoraBackend`) loads the same
locally generated Qwen2-family model (random weights, byte-level tokenizer) in that precision and runs
`--steps` LoRA steps (forward, backward, AdamW on the fp32 adapter). Printed per precision: peak RSS,
the memory model's prediction for the same shape and settings (`swarm.memory.estimate`), measured ÷
predicted, tokens/s, and both as ratios to fp32 measured in the same run.

Part 2: two 3-peer testbeds on configs/tiny.yaml with the same seed and rounds, one with
`--precision fp32,bf16,nf4` and one all fp32: every round's adapter hash must be one per swarm; printed
is the mean loss of the last 3 rounds of the mixed swarm ÷ the all-fp32 swarm's (goal <= 1.02).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_model(directory: Path, hidden: int, layers: int) -> None:
    """A random Qwen2 model with swarm's byte-level tokenizer, written like any local HF directory."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from swarm.model import _write_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=260, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    Qwen2ForCausalLM(cfg).save_pretrained(str(directory), safe_serialization=True)
    _write_tokenizer(directory)


def child(spec: dict) -> dict:
    """In a fresh interpreter: load the trainer in one precision, train `steps` steps, report."""
    import resource

    import numpy as np

    from swarm.hardware import tune_allocator

    tune_allocator()
    from swarm.backends.torch_lora import TorchLoraBackend
    from swarm.config import RunConfig
    from swarm.precision import PrecisionSettings

    run = RunConfig.model_validate({"name": "bench", "model": {"path": spec["model"]}, "lora": {"r": 8, "alpha": 16.0},
                                    "train": {"seq_len": spec["seq_len"], "micro_batch": spec["micro_batch"]}})
    backend = TorchLoraBackend(run, Path(spec["model"]), precision=PrecisionSettings(spec["precision"]))
    rng = np.random.default_rng(0)
    shape = (spec["micro_batch"], spec["seq_len"] + 1)
    backend.train([rng.integers(4, 260, shape)])  # warm-up step (kernels, allocator)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(spec["steps"]):
        r = backend.train([rng.integers(4, 260, shape)])
        backend.apply_update(r.grads)
        tokens += r.tokens
    seconds = time.perf_counter() - t0
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens_per_s": tokens / seconds}


def predicted(model: Path, precision: str, micro_batch: int, seq_len: int) -> int:
    from swarm.memory import ModelShape, estimate
    from swarm.precision import PrecisionSettings

    p = PrecisionSettings(precision)
    return estimate(ModelShape.from_dir(model), p.method, lora_r=8, micro_batch=micro_batch, seq_len=seq_len,
                    dtype=p.dtype, backend="cpu").total


def part1(args) -> None:
    from swarm.memory import ModelShape
    from swarm.precision import support

    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        model = Path(tmp) / "qwen2"
        write_model(model, args.hidden, args.layers)
        params = ModelShape.from_dir(model).param_count()
        print(f"model: Qwen2 family, {params / 1e6:.0f}M params (random), micro-batch {args.micro_batch} x seq {args.seq_len}, "
              f"{args.steps} steps each")
        rows = []
        for prec in ("fp32", "bf16", "nf4"):
            if not support(prec, "cpu").ok:
                print(f"{prec}: skipped ({support(prec, 'cpu').reason})")
                continue
            spec = {"model": str(model), "precision": prec, "steps": args.steps, "micro_batch": args.micro_batch,
                    "seq_len": args.seq_len}
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                                  env=env, timeout=1800)
            if proc.returncode != 0:
                print(f"{prec}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((prec, m, predicted(model, prec, args.micro_batch, args.seq_len)))
        base = next((m for p, m, _ in rows if p == "fp32"), None)
        print(f"{'precision':9} {'peak RSS':>10} {'predicted':>10} {'meas/pred':>9} {'tokens/s':>9} {'RSS/fp32':>9} {'tok/s/fp32':>10}")
        for prec, m, pred in rows:
            rss, tps = m["peak_rss_bytes"], m["tokens_per_s"]
            print(f"{prec:9} {rss / 2**20:8.0f}MB {pred / 2**20:8.0f}MB {rss / pred:9.2f} {tps:9.1f} "
                  f"{rss / base['peak_rss_bytes'] if base else float('nan'):9.2f} {tps / base['tokens_per_s'] if base else float('nan'):10.2f}")


def run_testbed(out: Path, precision: str, rounds: int) -> dict:
    cmd = [sys.executable, "-m", "swarm.testbed", "--peers", "3", "--max-rounds", str(rounds), "--config",
           str(ROOT / "configs" / "tiny.yaml"), "--precision", precision, "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = {}
    for k in range(3):
        f = out / f"peer{k}" / "metrics.jsonl"
        for line in (f.read_text().splitlines() if f.is_file() else []):
            r = json.loads(line)
            rows.setdefault(r["round"], []).append(r)
    return {"rc": proc.returncode, "rows": rows}


def part2(args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-precision-swarm-") as tmp:
        res = {}
        for label, prec in (("mixed", "fp32,bf16,nf4"), ("fp32", "fp32,fp32,fp32")):
            res[label] = run_testbed(Path(tmp) / label, prec, args.rounds)
            rows = res[label]["rows"]
            one_hash = all(len({r["adapter_sha256"] for r in rs}) == 1 for rs in rows.values())
            full = sum(1 for rs in rows.values() if len(rs) == 3)
            precs = sorted({r.get("precision") for rs in rows.values() for r in rs})
            print(f"swarm {label} (--precision {prec}): exit {res[label]['rc']}, {len(rows)} rounds ({full} with all 3 peers), "
                  f"precisions {precs}, one adapter hash every round: {one_hash}")
        def tail_loss(rows):
            last = sorted(rows)[-3:]
            vals = [r["loss"] for k in last for r in rows[k] if r.get("loss") is not None]
            return sum(vals) / len(vals)
        a, b = tail_loss(res["mixed"]["rows"]), tail_loss(res["fp32"]["rows"])
        print(f"loss (mean of the last 3 rounds): mixed {a:.4f}, all-fp32 {b:.4f}, ratio {a / b:.4f} (goal <= 1.02)")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return 0
    p = argparse.ArgumentParser(prog="python scripts/bench_precision.py", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--skip-swarm", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    if not args.skip_memory:
        part1(args)
    if not args.skip_swarm:
        part2(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
