"""The memory model beside the reference table, and measured / predicted peak memory on this machine.

    python scripts/memory_table.py                 # both tables (the measurement takes ~1 minute)
    python scripts/memory_table.py --no-measure    # the reference comparison only
    python scripts/memory_table.py --untuned       # also measure with glibc's default allocator

Reference: shared/reference/consumer-hardware-for-ai-training.txt §4. Our column is the model at
micro-batch 1, 512 tokens, bf16 on a CUDA GPU, LoRA r=8 on all seven linears, no checkpointing
(the setting tests/test_memory.py checks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.benchmark import CALIBRATION_MODELS, measure_step_peak  # noqa: E402
from swarm.memory import ALL_TARGETS, NAMED_SHAPES, TABLE_SIZES, ModelShape, estimate  # noqa: E402

REFERENCE = {"0.5B": (2, 4, 8), "1B": (3, 6, 16), "3B": (5, 10, 40), "7B": (8, 18, 56), "13B": (14, 32, 104), "30B": (30, 70, 240)}
SETTING = dict(micro_batch=1, seq_len=512, dtype="bfloat16", backend="cuda", lora_r=8, lora_targets=ALL_TARGETS)


def reference_table() -> list[str]:
    lines = ["| size | params | QLoRA ref | QLoRA ours | ratio | LoRA ref | LoRA ours | ratio | full ref | full ours | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in TABLE_SIZES:
        shape = NAMED_SHAPES[size]
        cells = [size, f"{shape.param_count() / 1e9:.2f}B"]
        for col, method in enumerate(("qlora", "lora", "full")):
            ours = estimate(shape, method, **SETTING).total / 1e9
            ref = REFERENCE[size][col]
            cells += [f"~{ref} GB", f"{ours:.1f} GB", f"{ours / ref:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def measured_table(tuned: bool) -> list[str]:
    lines = ["| model | params | micro-batch x seq | predicted | measured peak RSS | measured / predicted |",
             "|---|---|---|---|---|---|"]
    for name, (config, mb, sl) in CALIBRATION_MODELS.items():
        shape = ModelShape.from_config(config)
        pred = estimate(shape, "lora", lora_r=8, lora_targets=ALL_TARGETS, micro_batch=mb, seq_len=sl, dtype="float32", backend="cpu")
        got = measure_step_peak(config, mb, sl, lora_r=8, targets=ALL_TARGETS, steps=2, threads=2, tune_allocator=tuned)
        lines.append(f"| ~{name} | {shape.param_count() / 1e6:.1f}M | {mb} x {sl} | {pred.total / 2**20:.0f} MiB | "
                     f"{got['peak_rss_bytes'] / 2**20:.0f} MiB | {got['peak_rss_bytes'] / pred.total:.3f} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-measure", action="store_true", help="skip the measured-memory runs")
    p.add_argument("--untuned", action="store_true", help="also measure without swarm.hardware.tune_allocator()")
    args = p.parse_args()
    print("Memory model vs reference (§4), micro-batch 1 x 512 tokens, bf16, CUDA, LoRA r=8 all linears:\n")
    print("\n".join(reference_table()))
    if not args.no_measure:
        print("\nMeasured vs predicted peak memory, real LoRA steps (torch + peft, CPU fp32, r=8), allocator tuned:\n")
        print("\n".join(measured_table(True)))
        if args.untuned:
            print("\nThe same with glibc's default (dynamic) mmap threshold:\n")
            print("\n".join(measured_table(False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
