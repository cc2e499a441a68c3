"""A chaos run on 127.0.0.1: faults injected into a live swarm, and what they cost.

Timeline (rounds of the swarm):
  a, b, c and a hostile peer e (scripts/hostile_peer.py, NaN gradients by default) start together;
  c's whole process group is SIGKILLed in its round-K all-reduce (once parts are being exchanged, or
  with --kill-at matchmaking as it starts looking for its group); once a has finished round J,
  d joins late; once a has finished round L, b gets SIGTERM.
Prints: faults injected and survived, rounds lost per fault (failed round attempts on survivors),
attempts ended early because a member said it would not come, the longest gap between two rounds of a
survivor, time to recover after the kill, how often e's contribution was rejected and who named it,
late-join time to first contribution, and whether every survivor's final adapter hash is identical.

Usage: python scripts/chaos.py [--rounds 14] [--kill-round 4] [--kill-at {reduce,matchmaking}] [--join-after 6] [--term-after 9]
                               [--hostile {nan,huge,shape,outlier,tokens,none}] [--output DIR]
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


def _longest_gap(metrics: list[dict]) -> float | None:
    """The longest time between two consecutive rounds of a peer: a stall shows here."""
    times = [m["time"] for m in metrics]
    return round(max(b - a for a, b in zip(times, times[1:])), 2) if len(times) > 1 else None


class Swarm:
    def __init__(self, out: Path) -> None:
        self.out, self.procs, self.launched = out, {}, {}

    def start(self, name: str, args: list[str], env: dict | None = None, program: list[str] | None = None) -> None:
        d = self.out / name
        d.mkdir(parents=True, exist_ok=True)
        e = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **(env or {}))
        cmd = [sys.executable, *(program or ["-m", "swarm.join"]), "--host", "127.0.0.1", "--threads", "1",
               "--output", str(d), *args]
        self.procs[name] = subprocess.Popen(cmd, stdout=open(d / "log.txt", "w"), stderr=subprocess.STDOUT, env=e,
                                            start_new_session=True)
        self.launched[name] = time.time()

    def metrics(self, name: str) -> list[dict]:
        return read_metrics(self.out / name / "metrics.jsonl")

    def log(self, name: str) -> str:
        return (self.out / name / "log.txt").read_text(errors="replace")

    def addrs(self, name: str) -> list[str]:
        for _ in range(600):
            for line in self.log(name).splitlines():
                if line.startswith("initial peers:"):
                    return line.split(":", 1)[1].split()
            time.sleep(0.2)
        raise SystemExit(f"{name} did not start")

    def wait_round(self, name: str, n: int, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.metrics(name)) >= n:
                return
            time.sleep(0.2)
        raise SystemExit(f"{name} did not reach round {n}")

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=14)
    ap.add_argument("--kill-round", type=int, default=4)
    ap.add_argument("--join-after", type=int, default=6)
    ap.add_argument("--term-after", type=int, default=9)
    ap.add_argument("--kill-at", default="reduce", choices=["reduce", "matchmaking"],
                    help="kill c once its group formed and parts are exchanged (default), or as it starts looking for a group")
    ap.add_argument("--hostile", default="nan", choices=["nan", "huge", "shape", "outlier", "tokens", "none"])
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    out = Path(args.output or tempfile.mkdtemp(prefix="chaos-"))
    sw = Swarm(out)
    rounds = ["--max-rounds", str(args.rounds)]
    hostile = args.hostile != "none"
    first = ["--min-peers", "4" if hostile else "3"]
    try:
        sw.start("a", rounds + first)
        addrs = sw.addrs("a")
        sw.start("b", rounds + first + ["--initial-peers", *addrs])
        sw.start("c", rounds + first + ["--initial-peers", *addrs], env={"SWARM_CHAOS_DIE_IN_ROUND": str(args.kill_round),
                                                                      "SWARM_CHAOS_DIE_AT": args.kill_at})
        if hostile:
            sw.start("e", rounds + first + ["--initial-peers", *addrs],
                     program=[str(ROOT / "scripts" / "hostile_peer.py"), args.hostile])
        sw.procs["c"].wait(timeout=900)
        killed_at = time.time()
        sw.wait_round("a", args.join_after)
        sw.start("d", rounds + ["--initial-peers", *addrs])
        sw.wait_round("a", args.term_after)
        sw.procs["b"].send_signal(signal.SIGTERM)
        termed_at = time.time()
        sw.procs["b"].wait(timeout=120)
        b_exited = time.time()
        codes = {n: p.wait(timeout=900) for n, p in sw.procs.items() if n != "e"}
    finally:
        sw.kill_all()  # the hostile peer too

    ma = sw.metrics("a")
    after_kill = [m for m in ma if m["time"] > killed_at]
    recover_s = after_kill[0]["time"] - killed_at if after_kill else float("nan")
    d = sw.metrics("d")
    lost = {n: sw.log(n).count("round not applied") for n in ("a", "b", "d")}
    e_id = None
    if hostile:
        from swarm.transport.hivemind_dht import peer_id_of

        e_id = peer_id_of(out / "e" / "identity.key")
    named = {n: sw.log(n).count(f"rejected the contribution of peer {e_id}") for n in ("a", "b", "d")} if hostile else {}
    e_rounds = sorted({m["round"] for n in ("a", "b", "d") for m in sw.metrics(n) if e_id in m.get("members", [])})
    survivors = ["a", "d"]
    from swarm.adapters import adapter_sha256, load_peft_adapter

    finals = {n: adapter_sha256(load_peft_adapter(out / n / "adapter")) for n in survivors}  # what each peer ended with
    b_last = sw.metrics("b")[-1]
    b_same_round = next(m for m in ma if m["round"] == b_last["round"])
    result = {
        "faults": {
            "kill -9 in the all-reduce (%s) of round %d (c)" % (args.kill_at, args.kill_round): f"exit {codes['c']}",
            "late join after round %d (d)" % args.join_after: f"exit {codes['d']}",
            "SIGTERM after round %d (b)" % args.term_after: f"exit {codes['b']}",
            **({f"hostile peer e ({args.hostile}) from round 1": f"rejected and named {named} times by a/b/d; "
                f"rounds applied with e: {e_rounds or 'none'}"} if hostile else {}),
        },
        "survivor_exit_codes": {n: codes[n] for n in ("a", "d")},
        "failed_round_attempts": lost,
        "attempts_ended_early_for_a_member_that_left": {n: sw.log(n).count("will not be in this round") for n in ("a", "b", "d")},
        "longest_gap_between_rounds_seconds": {n: _longest_gap(sw.metrics(n)) for n in ("a", "d")},
        "rounds_completed": {n: [m["round"] for m in sw.metrics(n)][-1] for n in ("a", "b", "d")},
        "a_rounds_missing": sorted(set(range(1, args.rounds + 1)) - {m["round"] for m in ma}),
        "seconds_to_first_round_after_kill": round(recover_s, 2),
        "late_join_seconds_to_first_contribution": round(d[0]["time"] - sw.launched["d"], 2) if d else None,
        "late_joiner_first_round": d[0]["round"] if d else None,
        "sigterm_to_exit_seconds": round(b_exited - termed_at, 2),
        "b_final_adapter_matches_a_at_its_round": b_last["adapter_sha256"] == b_same_round["adapter_sha256"],
        "final_adapter_sha256": finals,
        "survivors_identical": len(set(finals.values())) == 1,
        "output": str(out),
    }
    print(json.dumps(result, indent=2))
    return 0 if result["survivors_identical"] and all(c == 0 for c in result["survivor_exit_codes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
