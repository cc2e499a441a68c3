"""averaging.codec int8 vs exact, side by side in one run: 2 peers over --transport tcp on 127.0.0.1.

Both runs train the same model and data (configs/tiny.yaml by default, the same rounds, uniform task sizes, a
held-out split never trained on). Printed per codec: averaging bytes on the wire per peer-round (metrics
bytes_sent + bytes_received, framing included, averaged over every peer's rows), whether every round ended with
one adapter hash, and the held-out loss of the final adapter; then int8 / exact for both (goal: bytes <= 0.25,
loss ~ 1.0).

Usage: python scripts/bench_codec.py [--rounds 10] [--config configs/tiny.yaml] [--output DIR]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import yaml  # noqa: E402

from bench_local_steps import EVAL_FRACTION, held_out_loss  # noqa: E402  (the same held-out measure)
from swarm.metrics import read_metrics  # noqa: E402

PEERS = 2


def codec_config(base: dict, codec: str) -> dict:
    run = json.loads(json.dumps(base))
    run["name"] = f"bench-codec-{codec}"
    run.setdefault("data", {})["eval_fraction"] = EVAL_FRACTION
    run.setdefault("averaging", {}).update(codec=codec, matchmaking_time=1.0)
    return run


def run_testbed(out: Path, config: dict, rounds: int, timeout: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "swarm.testbed", "--peers", str(PEERS), "--max-rounds", str(rounds),
                          "--config", str(path), "--output", str(out / "bed"), "--uniform", "--transport", "tcp",
                          "--timeout", str(timeout)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        log, _ = p.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        log, _ = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"testbed for {config['name']} failed ({p.returncode}):\n{log[-3000:]}")
    rows = [r for k in range(PEERS) for r in read_metrics(out / "bed" / f"peer{k}" / "metrics.jsonl")]
    hashes: dict[int, set[str]] = {}
    for r in rows:
        hashes.setdefault(r["round"], set()).add(r["adapter_sha256"])
    return {"bytes": sum(r["bytes_sent"] + r["bytes_received"] for r in rows) / len(rows), "rows": len(rows),
            "rounds": len(hashes), "identical": all(len(h) == 1 for h in hashes.values()),
            "wall": time.monotonic() - t0, "checkpoint": out / "bed" / "peer0" / "checkpoint"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--output", default=None, help="where the testbeds write (default: a temporary directory)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per testbed")
    a = ap.parse_args()
    base = yaml.safe_load(Path(a.config).read_text()) or {}
    out = Path(a.output or tempfile.mkdtemp(prefix="bench_codec_"))
    results = {}
    for codec in ("exact", "int8"):
        config = codec_config(base, codec)
        r = run_testbed(out / codec, config, a.rounds, a.timeout)
        r["loss"] = held_out_loss(config, r["checkpoint"])
        results[codec] = r
    print(f"bench_codec: {PEERS} peers over --transport tcp on 127.0.0.1, {Path(a.config).name}, {a.rounds} rounds each")
    print(f"{'codec':<7} {'bytes/peer-round':>17} {'rounds':>7} {'identical':>10} {'held-out loss':>14} {'wall s':>7}")
    for codec, r in results.items():
        print(f"{codec:<7} {r['bytes']:>17,.0f} {r['rounds']:>7} {str(r['identical']):>10} {r['loss']:>14.4f} "
              f"{r['wall']:>7.1f}")
    e, q = results["exact"], results["int8"]
    print(f"int8 / exact: bytes {q['bytes'] / e['bytes']:.3f} (goal <= 0.25), held-out loss {q['loss'] / e['loss']:.4f}")
    if not (e["identical"] and q["identical"]):
        raise SystemExit("a round ended with different adapters on different peers")


if __name__ == "__main__":
    main()
