"""Base precision side by side: memory, speed, and what a mixed-precision swarm learns.

usage: python scripts/bench_precision.py [--hidden 768] [--layers 12] [--steps 3] [--rounds 12] [--auto-rounds 3]
                                        [--torch fp32,bf16,nf4] [--mlx fp32,nf4] [--skip-memory] [--skip-swarm]

Part 1, one process per precision (fp32, bf16, nf4 when bitsandbytes is installed), each fresh so its
peak RSS is its own: the real trainer (`swarm.backends.torch_lora.TorchLoraBackend`) loads the same
locally generated Qwen2-family model (random weights, byte-level tokenizer) in that precision and runs
`--steps` LoRA steps (forward, backward, AdamW on the fp32 adapter). Printed per precision: peak RSS (VmHWM, and,
last, the peak reached by loading alone: the loaders convert one tensor at a time, so it stays below the step's),
the memory model's prediction for the same shape and settings (`swarm.memory.estimate`), measured ÷
predicted, tokens/s, and both as ratios to fp32 measured in the same run.

Rows: torch fp32/bf16/nf4, then MLX (`--mlx`, default fp32 and nf4 = mlx-lm's 4-bit QuantizedLinear); the
"/fp32" ratios are to the same framework's fp32 row. Every child imports torch (a peer always has it: hivemind).

Part 2: two 3-peer testbeds on configs/tiny.yaml with the same seed and rounds, one with
`--precision fp32,bf16,nf4` and one all fp32: every round's adapter hash must be one per swarm; printed
is the mean loss of the last 3 rounds of the mixed swarm ÷ the all-fp32 swarm's (goal <= 1.02).

Part 3: a 3-peer testbed with no --precision at all, only `--memory-limit` values set just above what the
memory model says micro-batch 1 needs in fp32, bf16 and nf4: each peer picks its own precision (auto), and
the three must differ while every round still ends with one adapter hash.
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

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
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


def _hwm() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that across execve from the
    forked parent, so a child of this (model-writing, ~0.9 GB at 131M) script would read at least the parent's."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def child(spec: dict) -> dict:
    """In a fresh interpreter: load the trainer in one precision, train `steps` steps, report."""
    import numpy as np

    from swarm.hardware import tune_allocator

    tune_allocator()
    import torch  # noqa: F401  (every peer process has it: hivemind imports it, whatever the backend)

    from swarm.backends import load_backend
    from swarm.config import RunConfig
    from swarm.precision import PrecisionSettings

    run = RunConfig.model_validate({"name": "bench", "model": {"path": spec["model"]}, "lora": {"r": 8, "alpha": 16.0},
                                    "train": {"seq_len": spec["seq_len"], "micro_batch": spec["micro_batch"]}})
    fw = spec.get("framework", "torch")
    backend = load_backend(fw, run=run, model_dir=Path(spec["model"]),
                           precision=PrecisionSettings(spec["precision"], framework=fw))
    load_peak = _hwm()  # reading + converting the checkpoint
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
    return {"peak_rss_bytes": _hwm(),
            "load_peak_rss_bytes": load_peak, "tokens_per_s": tokens / seconds}


def predicted(model: Path, precision: str, micro_batch: int, seq_len: int, framework: str = "torch") -> int:
    from swarm.memory import ModelShape, estimate
    from swarm.precision import PrecisionSettings

    p = PrecisionSettings(precision, framework=framework)
    return estimate(ModelShape.from_dir(model), p.method, lora_r=8, micro_batch=micro_batch, seq_len=seq_len,
                    dtype=p.dtype, backend=p.memory_backend).total


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
        print(f"{'backend/base':12} {'peak RSS':>10} {'predicted':>10} {'meas/pred':>9} {'tokens/s':>9} {'RSS/fp32':>9} {'tok/s/fp32':>10} {'load peak':>10}",
              flush=True)
        for fw, prec in [("torch", p) for p in args.torch] + [("mlx", p) for p in args.mlx]:
            label = f"{fw} {'4-bit' if fw == 'mlx' and prec == 'nf4' else prec}"
            if not support(prec, "cpu", fw).ok:
                print(f"{label}: skipped ({support(prec, 'cpu', fw).reason})")
                continue
            spec = {"model": str(model), "precision": prec, "steps": args.steps, "micro_batch": args.micro_batch,
                    "seq_len": args.seq_len, "framework": fw}
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                                  env=env, timeout=1800)
            if proc.returncode != 0:
                print(f"{label}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            pred = predicted(model, prec, args.micro_batch, args.seq_len, fw)
            rows.append((label, fw, m))
            base = next((b for lb, f, b in rows if f == fw and lb.endswith("fp32")), None)  # the same framework's fp32
            rss, tps = m["peak_rss_bytes"], m["tokens_per_s"]
            print(f"{label:12} {rss / 2**20:8.0f}MB {pred / 2**20:8.0f}MB {rss / pred:9.2f} {tps:9.1f} "
                  f"{rss / base['peak_rss_bytes'] if base else float('nan'):9.2f} "
                  f"{tps / base['tokens_per_s'] if base else float('nan'):10.2f} "
                  f"{m['load_peak_rss_bytes'] / 2**20:8.0f}MB", flush=True)


def run_testbed(out: Path, rounds: int, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "swarm.testbed", "--peers", "3", "--max-rounds", str(rounds), "--config", str(TINY),
           *flags, "--output", str(out)]
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
            res[label] = run_testbed(Path(tmp) / label, args.rounds, "--precision", prec)
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


def limits_for_three() -> list[tuple[str, float, int]]:
    """--memory-limit values (GiB) under which `swarm.precision.fit` -- what each peer runs with --precision auto --
    picks fp32, bf16 and nf4 on configs/tiny.yaml: each just above what micro-batch 1 needs in that precision."""
    from swarm.config import load_config
    from swarm.memory import ModelShape
    from swarm.model import resolve_model_dir
    from swarm.precision import fit, settings

    run = load_config(TINY)
    shape = ModelShape.from_dir(resolve_model_dir(run.model))
    out = []
    for prec in ("fp32", "bf16", "nf4"):
        forced = fit(settings(prec, "cpu"), run, shape, 1 << 40).needed_bytes  # micro-batch 1 in `prec`
        gib = (forced + 4096) / 2**30
        chosen = fit(settings("auto", "cpu"), run, shape, int(gib * 2**30)).settings
        out.append((chosen.precision + (" + checkpointing" if chosen.gradient_checkpointing else ""), gib, forced))
    return out


def part3(args) -> None:
    limits = limits_for_three()
    print("memory limits (GiB) and what the memory model picks under each: "
          + ", ".join(f"{g:.6f} -> {p} (needs {n / 2**20:.2f} MiB)" for p, g, n in limits))
    with tempfile.TemporaryDirectory(prefix="bench-precision-auto-") as tmp:
        res = run_testbed(Path(tmp) / "auto", args.auto_rounds, "--memory-limit", ",".join(repr(g) for _, g, _ in limits))
        rows = res["rows"]
        chosen = sorted({r.get("precision") for rs in rows.values() for r in rs})
        one_hash = all(len({r["adapter_sha256"] for r in rs}) == 1 for rs in rows.values())
        full = sum(1 for rs in rows.values() if len(rs) == 3)
        print(f"swarm auto (--memory-limit only): exit {res['rc']}, {len(rows)} rounds ({full} with all 3 peers), "
              f"precisions the peers chose {chosen} (three different: {len(chosen) == 3}), one adapter hash every round: {one_hash}")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: unwind, so child processes are stopped
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
    p.add_argument("--auto-rounds", type=int, default=3, help="rounds of the --memory-limit swarm (part 3)")
    p.add_argument("--torch", default="fp32,bf16,nf4", type=lambda v: [x for x in v.split(",") if x],
                   help="torch rows (comma list of base precisions; '' for none)")
    p.add_argument("--mlx", default="fp32,nf4", type=lambda v: [x for x in v.split(",") if x],
                   help="MLX rows (comma list of base precisions; nf4 = mlx-lm 4-bit; '' for none)")
    p.add_argument("--skip-swarm", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    if not args.skip_memory:
        part1(args)
    if not args.skip_swarm:
        part2(args)
        part3(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
