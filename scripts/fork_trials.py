"""Hand-started swarms: do rounds ever fork? (issue: "rounds never fork")

Each trial starts N peers the way the README's "Join from other machines" does, by hand: a first
peer, then the others with `--initial-peers` at random delays (0..--max-delay s, seeded), all on
127.0.0.1. Optionally the cores are kept busy by other processes. When every peer has left, it
reads every peer's metrics.jsonl and saved adapter and counts forked rounds: round numbers for
which two peers committed different `adapter_sha256`s.

    python scripts/fork_trials.py [--trials 3] [--peers 4] [--rounds 25] [--busy 2] [--seed 0]

Prints one line per trial and a summary (trials x rounds with zero forked rounds, joiner launch ->
first contributed round). Every process it starts is killed by PID (process group) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _busy(n: int) -> list[subprocess.Popen]:
    """n processes spinning on the CPU (other work on the machine)."""
    code = "import time\nend = time.time() + 900\nwhile time.time() < end: pass\n"
    return [subprocess.Popen([sys.executable, "-c", code], start_new_session=True) for _ in range(n)]


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def _addrs(log: Path, proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("initial peers:"):
                return line.split(":", 1)[1].split()
        if proc.poll() is not None:
            raise RuntimeError(f"first peer exited early:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError("first peer printed no address")


def _wait_all(procs: dict[str, subprocess.Popen], end: float) -> dict[str, int | None]:
    """Exit codes once every process has ended, None for those still running at monotonic time `end`."""
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            codes[name] = None
    return codes


def read_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def forks(outputs: dict[str, Path]) -> dict[int, dict[str, set[str]]]:
    """Round -> {adapter hash -> peers that committed it}, for rounds with more than one hash."""
    by_round: dict[int, dict[str, set[str]]] = {}
    for name, out in outputs.items():
        for row in read_rows(out):
            by_round.setdefault(row["round"], {}).setdefault(row["adapter_sha256"], set()).add(name)
    return {r: hashes for r, hashes in sorted(by_round.items()) if len(hashes) > 1}


def trial(base: Path, *, peers: int, rounds: int, seed: int, busy: int = 0, max_delay: float = 15.0,
          timeout: float = 420.0, config: Path | None = None) -> dict:
    """One hand-started swarm; returns what happened (forks, rounds, joiners' first contributed round)."""
    from swarm.adapters import adapter_sha256, load_peft_adapter

    rng = random.Random(seed)
    delays = sorted(rng.uniform(0, max_delay) for _ in range(peers - 1))
    names = [chr(ord("a") + i) for i in range(peers)]
    procs: dict[str, subprocess.Popen] = {}
    launched: dict[str, float] = {}
    hogs = _busy(busy)
    try:
        def start(name: str, extra: list[str]) -> None:
            out = base / name
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "swarm.join", "--host", "127.0.0.1", "--output", str(out), "--threads", "1",
                   "--max-rounds", str(rounds), *extra]
            if config is not None:
                cmd += ["--config", str(config)]
            launched[name] = time.time()
            procs[name] = subprocess.Popen(cmd, stdout=open(out / "log.txt", "w"), stderr=subprocess.STDOUT,
                                           env=_env(), cwd=ROOT, start_new_session=True)

        t0 = time.monotonic()
        start(names[0], [])
        addrs = _addrs(base / names[0] / "log.txt", procs[names[0]])
        t_addr = time.monotonic()
        for name, delay in zip(names[1:], delays):
            time.sleep(max(0.0, t_addr + delay - time.monotonic()))
            start(name, ["--initial-peers", *addrs])
        codes = _wait_all(procs, t0 + timeout)
    finally:
        for p in list(procs.values()) + hogs:
            _kill(p)
    outputs = {n: base / n for n in names}
    found = forks(outputs)
    rows = {n: read_rows(o) for n, o in outputs.items()}
    disk = {}
    for n, o in outputs.items():
        try:
            disk[n] = adapter_sha256(load_peft_adapter(o / "adapter"))
        except Exception:
            disk[n] = None
    finals = {}  # the adapter each peer's checkpoint holds (its last row's, or the final state it downloaded)
    for n, o in outputs.items():
        try:
            finals[n] = json.loads((o / "checkpoint" / "meta.json").read_text())["adapter_sha256"]
        except (OSError, ValueError, KeyError):
            pass
    first_round = {}
    for n in names[1:]:
        if rows[n]:
            first_round[n] = round(rows[n][0]["time"] - launched[n], 2)
    return {"seed": seed, "peers": peers, "busy": busy, "delays": [round(d, 1) for d in delays], "exit": codes,
            "rounds": max((r[-1]["round"] for r in rows.values() if r), default=0),
            "forked_rounds": sorted(found), "forks": {r: {h[:12]: sorted(p) for h, p in hs.items()} for r, hs in found.items()},
            "disk_matches_checkpoint": all(disk[n] == finals.get(n) for n in names),
            "final_identical": len({disk[n] for n in names}) == 1,
            "lost_rounds": {n: sum(r.get("lost_rounds", 0) for r in rows[n]) for n in names},
            "joiner_first_round_s": first_round}


def partition(base: Path, *, rounds: int = 30, apart: int = 5, timeout: float = 420.0) -> dict:
    """Two swarms (x1+x2, y1+y2) train apart for `apart` rounds, then peer z, started with an address of each,
    joins them into one. Returns which side lost, the rounds of work it lost, and the seconds from z's launch
    until every peer holds the same state (the first round all five committed with one lineage)."""
    procs: dict[str, subprocess.Popen] = {}
    launched: dict[str, float] = {}

    def start(name: str, initial: list[str]) -> None:
        out = base / name
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "swarm.join", "--host", "127.0.0.1", "--output", str(out), "--threads", "1",
               "--max-rounds", str(rounds), *(["--initial-peers", *initial] if initial else [])]
        launched[name] = time.time()
        procs[name] = subprocess.Popen(cmd, stdout=open(out / "log.txt", "w"), stderr=subprocess.STDOUT, env=_env(),
                                       cwd=ROOT, start_new_session=True)

    def wait_rows(name: str, n: int, until: float) -> None:
        while time.monotonic() < until and len(read_rows(base / name)) < n:
            if procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{(base / name / 'log.txt').read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)

    end = time.monotonic() + timeout
    try:
        start("x1", [])
        start("y1", [])
        ax, ay = _addrs(base / "x1" / "log.txt", procs["x1"]), _addrs(base / "y1" / "log.txt", procs["y1"])
        start("x2", ax)
        start("y2", ay)
        for name in ("x2", "y2"):
            wait_rows(name, apart, end)
        start("z", ax[:1] + ay[:1])
        codes = _wait_all(procs, end)
    finally:
        for p in procs.values():
            _kill(p)
    rows = {n: read_rows(base / n) for n in procs}
    lost = {n: sum(r.get("lost_rounds", 0) for r in rs) for n, rs in rows.items()}
    lost_tokens = {n: sum(r.get("lost_tokens", 0) for r in rs) for n, rs in rows.items()}
    by_round: dict[int, dict[str, dict]] = {}
    for n, rs in rows.items():
        for r in rs:
            by_round.setdefault(r["round"], {})[n] = r  # the last row a peer wrote for a round (after a switch)
    agreed = None
    for rnd in sorted(by_round):
        got = by_round[rnd]
        if len(got) == len(procs) and len({r["lineage"] for r in got.values()}) == 1 and \
                min(r["time"] for r in got.values()) > launched["z"]:
            agreed = rnd
            break
    after = [r for r in sorted(by_round) if agreed is not None and r >= agreed]
    return {"exit": codes, "lost_rounds": lost, "lost_tokens": lost_tokens,
            "agreed_round": agreed,
            "seconds_to_agree": round(max(r["time"] for r in by_round[agreed].values()) - launched["z"], 2) if agreed else None,
            "forked_rounds_after_agreement": [r for r in after if len({x["adapter_sha256"] for x in by_round[r].values()}) > 1],
            "final": {n: rs[-1]["adapter_sha256"][:12] if rs else None for n, rs in rows.items()}}


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: unwind, so child processes are stopped
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--busy", type=int, default=0, help="CPU-spinning processes during each trial")
    p.add_argument("--seed", type=int, default=0, help="first trial's seed (then +1 per trial)")
    p.add_argument("--max-delay", type=float, default=15.0)
    p.add_argument("--keep", default=None, metavar="DIR", help="copy the peers' outputs of a trial that forked here")
    p.add_argument("--partition", action="store_true", help="instead: two swarms apart, then bridged by a peer")
    args = p.parse_args()
    if args.partition:
        with tempfile.TemporaryDirectory(prefix="swarm-partition-") as tmp:
            res = partition(Path(tmp), rounds=args.rounds + 5)
            if args.keep:
                shutil.copytree(tmp, Path(args.keep) / "partition", dirs_exist_ok=True)
        print(json.dumps(res))
        return 0 if res["agreed_round"] is not None and all(c == 0 for c in res["exit"].values()) else 1
    results = []
    for i in range(args.trials):
        with tempfile.TemporaryDirectory(prefix="swarm-fork-") as tmp:
            res = trial(Path(tmp), peers=args.peers, rounds=args.rounds, seed=args.seed + i, busy=args.busy,
                        max_delay=args.max_delay)
            if args.keep:
                shutil.copytree(tmp, Path(args.keep) / f"seed{args.seed + i}", dirs_exist_ok=True)
        results.append(res)
        print(json.dumps(res), flush=True)
    clean = sum(1 for r in results if not r["forked_rounds"] and all(c == 0 for c in r["exit"].values()))
    joins = [s for r in results for s in r["joiner_first_round_s"].values()]
    print(f"trials with zero forked rounds: {clean}/{len(results)} ({sum(r['rounds'] for r in results)} rounds in all); "
          f"joiner launch -> first contributed round: median {sorted(joins)[len(joins) // 2] if joins else float('nan')} s, "
          f"max {max(joins, default=float('nan'))} s")
    return 0 if clean == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
