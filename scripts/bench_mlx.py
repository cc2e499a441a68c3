"""MLX backend tokens/s next to mlx-lm's own LoRA trainer, same model, same batches, one process.

    python scripts/bench_mlx.py [--steps 20] [--seq-len 128] [--micro-batch 8] [--model-path DIR]

Both sides train the run's LoRA (rank, scale, target modules) on the run's base model in fp32 with
AdamW, one optimizer step per micro-batch of `micro_batch` x `seq_len` tokens:
  swarm : MlxLoraBackend.train([batch]) + apply_update(grads)   (grads go through numpy, as in a swarm),
          half the steps before the mlx-lm run and half after (the machine's load drifts)
  mlx-lm: mlx_lm.tuner.trainer.train(...) driven offline on the same token windows; its own
          tokens/s report (the second of two reports, so the first absorbs compilation and warm-up).
Prints one table and the ratio swarm / mlx-lm.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _windows(run, model_dir: Path, count: int) -> np.ndarray:
    from swarm.data import corpus_tokens, sample_batches

    tokens = corpus_tokens(run.data.source, model_dir)
    (w,) = sample_batches(tokens, run.train.seq_len, count, count, seed=0, round_=0, key=0)
    return w


def bench_swarm(run, model_dir: Path, windows: np.ndarray, steps: int, warmup: int) -> dict:
    from swarm.backends.mlx_lora import MlxLoraBackend

    b = MlxLoraBackend(run, model_dir, seed=0)
    mb = run.train.micro_batch
    batches = [windows[i * mb:(i + 1) * mb] for i in range(len(windows) // mb)]
    for i in range(warmup):
        b.apply_update(b.train([batches[i % len(batches)]]).grads)
    tokens, train_s, losses = 0, 0.0, []
    start = time.perf_counter()
    for i in range(steps):
        r = b.train([batches[i % len(batches)]])
        b.apply_update(r.grads)
        tokens += r.tokens
        train_s += r.seconds
        losses.append(r.loss_sum / r.tokens)
    total = time.perf_counter() - start
    return {"tok_s": tokens / total, "train_only_tok_s": tokens / train_s, "loss_first": losses[0], "loss_last": losses[-1]}


def bench_mlx_lm(run, model_dir: Path, windows: np.ndarray, steps: int) -> dict:
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from swarm.adapters import mlx_adapter_config
    from swarm.backends.mlx_lora import MlxLoraBackend

    # The LoRA keys mlx-lm needs for this run, as save_mlx_adapter would write them.
    names = MlxLoraBackend(run, model_dir).adapter_names()
    lora_cfg = mlx_adapter_config(dict.fromkeys(names), run)

    model, _ = load_model(Path(model_dir))
    import mlx.core as mx

    model.set_dtype(mx.float32)
    model.freeze()
    linear_to_lora_layers(model, lora_cfg["num_layers"], lora_cfg["lora_parameters"])
    t = run.train
    opt = optim.AdamW(learning_rate=t.lr, betas=list(t.betas), eps=t.eps, weight_decay=t.weight_decay, bias_correction=True)

    reports = []

    class Callback:
        def on_train_loss_report(self, info):
            reports.append(info)

        def on_val_loss_report(self, info):
            pass

    dataset = [(list(map(int, w)), 0) for w in windows]  # (tokens, prompt offset) as mlx-lm datasets yield
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(batch_size=t.micro_batch, iters=2 * steps, steps_per_report=steps,
                            steps_per_eval=10**9, steps_per_save=10**9, val_batches=0,
                            max_seq_length=t.seq_len + 1,  # no padding beyond our windows
                            adapter_file=str(Path(tmp) / "adapters.safetensors"))
        train(model, opt, dataset, val_dataset=None, args=args, training_callback=Callback())
    last = reports[-1]
    return {"tok_s": last["tokens_per_second"], "loss_last": last["train_loss"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed swarm-backend steps first")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--model-path", default=None, help="HF model directory (default: the embedded model)")
    a = ap.parse_args(argv)

    import mlx.core as mx

    from swarm.config import RunConfig
    from swarm.model import resolve_model_dir

    run = RunConfig()
    upd = {k: v for k, v in {"seq_len": a.seq_len, "micro_batch": a.micro_batch}.items() if v}
    model = run.model if a.model_path is None else run.model.model_copy(update={"path": a.model_path})
    run = run.model_copy(update={"train": run.train.model_copy(update=upd), "model": model})
    model_dir = resolve_model_dir(run.model)
    windows = _windows(run, model_dir, run.train.micro_batch * 8)

    # swarm before and after mlx-lm, so a drift in machine load (shared CPUs) does not favour either side
    before = bench_swarm(run, model_dir, windows, (a.steps + 1) // 2, a.warmup)
    theirs = bench_mlx_lm(run, model_dir, windows, a.steps)
    after = bench_swarm(run, model_dir, windows, a.steps // 2, a.warmup)
    ours = {k: (before[k] + after[k]) / 2 for k in ("tok_s", "train_only_tok_s")} | {"loss_last": after["loss_last"]}

    print(f"\ndevice {mx.default_device()}, mlx {mx.__version__}, cpus {os.cpu_count()}, model {model_dir.name}, "
          f"r={run.lora.r}, batch {run.train.micro_batch}x{run.train.seq_len}, {a.steps} timed steps each")
    print(f"{'':28s}{'tokens/s':>10s}{'last loss':>11s}")
    print(f"{'swarm MlxLoraBackend':28s}{ours['tok_s']:10.0f}{ours['loss_last']:11.4f}   "
          f"(train only, no update: {ours['train_only_tok_s']:.0f} tok/s)")
    print(f"{'mlx-lm trainer (compiled)':28s}{theirs['tok_s']:10.0f}{theirs['loss_last']:11.4f}")
    print(f"ratio swarm / mlx-lm: {ours['tok_s'] / theirs['tok_s']:.2f}   "
          f"(swarm measured before and after mlx-lm: {before['tok_s']:.0f} / {after['tok_s']:.0f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    sys.exit(main())
