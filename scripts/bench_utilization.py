"""Compute utilization (compute time / wall time) on emulated home links, per averaging mode (issue 13's figure).

Two peers over `--transport tcp`, each behind an emulated 20 Mbit up / 100 Mbit down / 40 ms line (swarm.links),
train a model whose adapter bytes per second of round compute match a 7B, r=16, all-linear LoRA on an RTX 3060.
Modes: exact (averaging.codec exact), int8 (averaging.codec int8), int8 + overlap (applying round r's average one
round late: not built, printed as such), local steps H (train.local_steps H with tokens_per_round raised H times,
so each inner step trains what a synchronous step did), and local steps H + int8.

The match (numbers printed by the script, from `lora_values` and `Target`):
  Adapter. Llama-2-7B: hidden 4096, intermediate 11008, 32 layers, 32 heads (no GQA). LoRA r=16 on all 7 linear
  layers, r * (in + out) values each: q, k, v, o 16 * (4096 + 4096) = 131,072 each; gate, up 16 * (4096 + 11008)
  = 241,664 each, down 16 * (11008 + 4096) = 241,664; 1,249,280 per layer, 39,976,960 for 32 layers.
  Bytes. The exact codec sends each value as a float64 (8 B) and a 2-peer butterfly sends half the vector to the
  other reducer and the other half's sum back: ~8 B/value each way, 319.8 MB sent (and received) per peer-round.
  Compute. Llama-2-7B has N = 6.74e9 parameters. QLoRA with gradient checkpointing costs ~6N FLOP/token: forward 2N,
  recomputed forward 2N, backward for the activations 2N, and no weight gradients for the frozen 4-bit base (the
  adapter's own 6 * 40M is < 1%; attention scores at 512 tokens ~2%, both ignored): 4.04e10 FLOP/token. An RTX 3060
  (28 SMs at 1.777 GHz) peaks at 51 TFLOPS dense fp16 with fp16 accumulation, but GeForce Ampere runs fp16/bf16 with
  fp32 accumulation (what mixed-precision training uses) at half that rate: 25.6 TFLOPS (NVIDIA's GA102
  whitepaper lists the same 2:1 for the RTX 3090, 142 vs 71). Assumed achieved: ~35% of it, 9 TFLOPS (micro-batches
  of 1-2 x 512 tokens fit 12 GB, bitsandbytes dequantizes every NF4 weight before each matmul, three times per
  micro-batch with checkpointing, and the LoRA and elementwise kernels are memory-bound): 9e12 / 4.04e10 = 222
  tokens/s (`--gpu-tokens-per-s`). Round: 8192 tokens per peer (16 sequences of 512, e.g. micro-batch 2 x 8
  accumulation steps; `--gpu-round-tokens`): 8192 / 222 = 37.0 s of compute.
  Ratio. 319.8e6 B / 37.0 s = 8.65 MB of averaging traffic per second of compute (per direction). With the link
  fixed, utilization is set by this ratio: exact needs 319.8e6 * 8 / 20e6 = 128 s of uplink per 37 s of compute
  (so a real 7B swarm on such lines needs averaging.allreduce_timeout above ~130 s; the default is 30).
  Testbed model. The builtin Llama (hidden 256, intermediate 688, 4 layers, 4 heads) with r=128 on all linear
  layers: 2,498,560 values, 19.99 MB a direction, so a round must compute 19.99e6 / 8.65e6 = 2.31 s per peer. A
  calibration run (exact, 127.0.0.1, no link, one warm-up round and two measured) measures compute seconds per
  token on this machine; tokens_per_round is set to peers x the tokens that take 2.31 s (whole sequences), and the
  ratio achieved in the linked exact run is printed next to the target (within 20% is a match).
  The rank is large for so small a model so that a round's compute is seconds, not tens of milliseconds: the
  per-round latencies (matchmaking, 40 ms lines, the signed verification records) then weigh on the testbed about
  as little as they would next to a 37 s round.

Utilization, per peer: wall = from the commit of the warm-up round (round 1's metrics row `time`, written after its
commit) to the commit of the last round; compute = the sum of `compute_seconds` (training minus pacing sleeps)
over the rounds after the warm-up. Printed: their ratio, mean over peers (goal >= 0.9 for the best mode).
Also per mode: averaging bytes sent and received per peer-round (metrics bytes_sent/bytes_received, framing
included), compute and wall seconds per round, tokens trained per peer-round, and the held-out loss of the final
adapter (the same held-out windows in every mode; local-steps modes train H times the tokens per round).

Usage: python scripts/bench_utilization.py [--rounds 2] [--local-steps 16] [--modes exact,int8,overlap,local,local-int8]
       [--link 20mbit/100mbit/40ms] [--gpu-tokens-per-s 220] [--gpu-round-tokens 8192] [--output DIR]
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import yaml  # noqa: E402

from bench_local_steps import EVAL_FRACTION, held_out_loss  # noqa: E402  (the same held-out measure)
from swarm.metrics import read_metrics  # noqa: E402

PEERS = 2
BYTES_PER_VALUE = 8          # exact codec: one float64 per value, each way
MATCH_TOLERANCE = 0.2
WARMUP = 1                   # rounds before the measured ones
CALIBRATION_TOKENS = 4096    # the calibration run's tokens_per_round (2048 per peer)
CALIBRATION_ROUNDS = 3

LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "rank": 16}
LLAMA2_7B_PARAMS = 6.74e9
RTX3060_BF16_TFLOPS = 25.6   # dense, fp32 accumulation (51.2 with fp16 accumulation)
ACHIEVED_FRACTION = 0.35     # the reasoning is in the module docstring

BASE = {  # the testbed's run (module docstring: why r=128)
    "model": {"builtin": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "num_key_value_heads": 4, "seed": 0}},
    "lora": {"r": 128, "alpha": 256.0},
    "train": {"seq_len": 128, "micro_batch": 8, "tokens_per_round": CALIBRATION_TOKENS, "lr": 1e-3},
    "data": {"eval_fraction": EVAL_FRACTION},
    "averaging": {"matchmaking_time": 1.0},
}


def lora_values(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, rank: int) -> int:
    """Adapter values of a Llama with LoRA on all 7 linear layers: r * (in + out) per layer."""
    kv = hidden // heads * kv_heads
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),          # q, k, v, o
              (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]  # gate, up, down
    return layers * sum(rank * (i + o) for i, o in shapes)


@dataclass(frozen=True)
class Target:
    """The 3060 scenario: adapter bytes per direction per peer-round ÷ compute seconds per round."""

    values: int
    tokens_per_s: float
    round_tokens: int

    @property
    def bytes(self) -> int:
        return self.values * BYTES_PER_VALUE

    @property
    def compute_seconds(self) -> float:
        return self.round_tokens / self.tokens_per_s

    @property
    def ratio(self) -> float:
        return self.bytes / self.compute_seconds


def model_values(run: dict) -> int:
    b, r = run["model"]["builtin"], run["lora"]["r"]
    return lora_values(b["hidden_size"], b["intermediate_size"], b["num_hidden_layers"], b["num_attention_heads"],
                       b["num_key_value_heads"], r)


def mode_config(tokens: int, codec: str, h: int, name: str) -> dict:
    run = json.loads(json.dumps(BASE))
    run["name"] = name
    run["train"].update(tokens_per_round=tokens * h, local_steps=h)
    run["averaging"]["codec"] = codec
    return run


def run_testbed(out: Path, config: dict, rounds: int, link: str | None, timeout: float) -> list[list[dict]]:
    """A 2-peer tcp testbed (behind `link` if given): each peer's metrics rows."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "swarm.testbed", "--peers", str(PEERS), "--max-rounds", str(rounds),
           "--config", str(path), "--output", str(out / "bed"), "--uniform", "--transport", "tcp",
           "--timeout", str(timeout)] + (["--link", link] if link else [])
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        log, _ = p.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        log, _ = p.communicate()
    (out / "testbed.log").write_text(log)
    if p.returncode != 0:
        raise SystemExit(f"testbed for {config['name']} failed ({p.returncode}), see {out}:\n{log[-3000:]}")
    return [read_metrics(out / "bed" / f"peer{k}" / "metrics.jsonl") for k in range(PEERS)]


def measure(peers: list[list[dict]], warmup: int = WARMUP) -> dict:
    """Per-round means and utilization over the rounds after `warmup`, from each peer's metrics rows (pure).

    Per peer: wall = time of its last row - time of its warm-up round's row (rows are written after the commit);
    utilization = sum(compute_seconds) of the measured rows / wall. Means over peers; a peer without its warm-up
    row or any measured row (it caught up by download) is left out and counted in `skipped`."""
    per_peer, hashes = [], {}
    for rows in peers:
        for r in rows:
            hashes.setdefault(r["round"], set()).add(r["adapter_sha256"])
        start = [r for r in rows if r["round"] == warmup]
        measured = [r for r in rows if r["round"] > warmup]
        if not start or not measured:
            continue
        wall = measured[-1]["time"] - start[0]["time"]
        n = len(measured)
        compute = sum(r["compute_seconds"] for r in measured)
        per_peer.append({"rounds": n, "compute": compute / n, "wall": wall / n, "utilization": compute / wall,
                         "sent": sum(r["bytes_sent"] for r in measured) / n,
                         "received": sum(r["bytes_received"] for r in measured) / n,
                         "tokens": sum(r["tokens"] for r in measured) / n,
                         "cut_short": sum(bool(r.get("cut_short")) for r in measured)})
    if not per_peer:
        raise SystemExit("no peer has a measured round after the warm-up")
    mean = {k: sum(p[k] for p in per_peer) / len(per_peer) for k in per_peer[0]}
    mean["rounds"] = min(p["rounds"] for p in per_peer)
    mean["cut_short"] = sum(p["cut_short"] for p in per_peer)
    mean["skipped"] = len(peers) - len(per_peer)
    mean["identical"] = all(len(h) == 1 for h in hashes.values())
    return mean


def calibrate(out: Path, target_seconds: float, timeout: float) -> tuple[int, float]:
    """Tokens per round whose per-peer compute takes `target_seconds` here, and the measured seconds per token."""
    seq = BASE["train"]["seq_len"]
    peers = run_testbed(out, mode_config(CALIBRATION_TOKENS, "exact", 1, "bench-util-calibrate"), CALIBRATION_ROUNDS,
                        None, timeout)
    rows = [r for p in peers for r in p if r["round"] > WARMUP]
    per_token = sum(r["compute_seconds"] for r in rows) / sum(r["tokens"] for r in rows)
    sequences = max(1, round(target_seconds / per_token / seq))
    return PEERS * sequences * seq, per_token


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: unwind, so child processes are stopped
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds per mode (after one warm-up round)")
    ap.add_argument("--local-steps", type=int, default=16, help="H of the local-steps modes")
    ap.add_argument("--modes", default="exact,int8,overlap,local,local-int8",
                    help="comma list of exact, int8, overlap (not built), local, local-int8")
    ap.add_argument("--link", default="20mbit/100mbit/40ms", help="every peer's emulated line (swarm.testbed --link)")
    ap.add_argument("--gpu-tokens-per-s", type=float, default=None,
                    help="the 3060's assumed QLoRA 7B training throughput (default: 35%% of 25.6 TFLOPS / 6N, ~220)")
    ap.add_argument("--gpu-round-tokens", type=int, default=8192, help="tokens one 3060 peer trains per round")
    ap.add_argument("--output", default=None, help="where the testbeds write (default: a temporary directory)")
    a = ap.parse_args()
    modes = a.modes.split(",")
    known = {"exact", "int8", "overlap", "local", "local-int8"}
    if set(modes) - known or a.rounds < 1 or a.local_steps < 2:
        ap.error(f"--modes from {sorted(known)}, --rounds >= 1, --local-steps >= 2")
    out = Path(a.output or tempfile.mkdtemp(prefix="bench_util_"))

    flop_per_token = 6 * LLAMA2_7B_PARAMS
    gpu_tps = a.gpu_tokens_per_s or ACHIEVED_FRACTION * RTX3060_BF16_TFLOPS * 1e12 / flop_per_token
    target = Target(lora_values(**LLAMA2_7B), gpu_tps, a.gpu_round_tokens)
    values = model_values(BASE)
    need = values * BYTES_PER_VALUE / target.ratio
    print(f"target: Llama-2-7B LoRA r=16 all-linear = {target.values:,} values, x{BYTES_PER_VALUE} B = "
          f"{target.bytes / 1e6:.1f} MB each way per peer-round")
    print(f"        RTX 3060: {ACHIEVED_FRACTION:.0%} of {RTX3060_BF16_TFLOPS} TFLOPS / (6 x {LLAMA2_7B_PARAMS:.3g} FLOP/token)"
          f" = {gpu_tps:.0f} tokens/s; {target.round_tokens} tokens/round -> {target.compute_seconds:.1f} s compute")
    print(f"        ratio {target.ratio / 1e6:.2f} MB per compute-second; exact on this link there: "
          f"{target.bytes * 8 / 20e6:.0f} s of 20 Mbit uplink per round")
    print(f"testbed: builtin Llama h256/i688/L4, LoRA r={BASE['lora']['r']} all-linear = {values:,} values, "
          f"{values * BYTES_PER_VALUE / 1e6:.2f} MB -> needs {need:.2f} s compute per peer-round; output {out}", flush=True)

    t0 = time.monotonic()
    tokens, per_token = calibrate(out / "calibrate", need, timeout=300)
    predicted = values * BYTES_PER_VALUE / (per_token * tokens / PEERS)
    print(f"calibration (exact, 127.0.0.1, no link): {per_token * 1e3:.3f} ms compute per token per peer -> "
          f"tokens_per_round {tokens} ({tokens // PEERS} per peer), predicted ratio {predicted / 1e6:.2f} MB/s "
          f"(target {target.ratio / 1e6:.2f}); {time.monotonic() - t0:.0f}s", flush=True)

    h = a.local_steps
    plans = {"exact": ("exact", "exact", 1), "int8": ("int8", "int8", 1), "local": (f"local H={h}", "exact", h),
             "local-int8": (f"local H={h} + int8", "int8", h)}
    results = []
    for mode in modes:
        if mode == "overlap":
            results.append(("int8 + overlap", None))
            continue
        label, codec, steps = plans[mode]
        config = mode_config(tokens, codec, steps, f"bench-util-{mode}")
        began = time.monotonic()
        timeout = 120 + (a.rounds + WARMUP) * (steps * need * 4 + 60)
        peers = run_testbed(out / mode, config, a.rounds + WARMUP, a.link, timeout)
        res = measure(peers)
        res["loss"] = held_out_loss(config, out / mode / "bed" / "peer0" / "checkpoint")
        res["ratio"] = values * BYTES_PER_VALUE / res["compute"] if steps == 1 else None
        results.append((label, res))
        print(f"  {label}: {res['rounds']} measured rounds, utilization {res['utilization']:.3f}, "
              f"identical={res['identical']}, {time.monotonic() - began:.0f}s", flush=True)

    print(f"\nbench_utilization: {PEERS} peers over --transport tcp, --link {a.link}, {a.rounds} measured rounds after "
          f"{WARMUP} warm-up, tokens_per_round {tokens} (x H for local steps)")
    print(f"{'mode':<20} {'sent MB/peer-rnd':>16} {'recv MB/peer-rnd':>16} {'tokens/peer-rnd':>15} {'compute s/rnd':>13} "
          f"{'wall s/rnd':>10} {'utilization':>11} {'held-out loss':>13}")
    for label, r in results:
        if r is None:
            print(f"{label:<20} {'not built (issue 13 item 3: apply round r average one round late)':>98}")
            continue
        print(f"{label:<20} {r['sent'] / 1e6:>16.2f} {r['received'] / 1e6:>16.2f} {r['tokens']:>15.0f} "
              f"{r['compute']:>13.2f} {r['wall']:>10.2f} {r['utilization']:>11.3f} {r['loss']:>13.4f}")
    for label, r in results:
        if r is not None and r["ratio"] is not None and label == "exact":  # the match is defined on the exact run
            off = r["ratio"] / target.ratio - 1
            print(f"{label}: adapter bytes / compute s = {r['ratio'] / 1e6:.2f} MB/s vs target {target.ratio / 1e6:.2f}"
                  f" ({off:+.0%}{'' if abs(off) <= MATCH_TOLERANCE else ', OUTSIDE the 20% match'})")
    notes = [f"{label}: {r['cut_short']} round(s) cut short at the deadline, {r['skipped']} peer(s) without measured rounds"
             for label, r in results if r is not None and (r["cut_short"] or r["skipped"])]
    for n in notes:
        print(n)
    best = max((r["utilization"], label) for label, r in results if r is not None) if any(results) else None
    if best:
        print(f"best: {best[1]} at {best[0]:.3f} (goal >= 0.9); total {time.monotonic() - t0:.0f}s")
    if not all(r["identical"] for _, r in results if r is not None):
        print("a round ended with different adapters on different peers")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
