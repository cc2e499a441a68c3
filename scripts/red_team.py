"""Red team: each scripts/hostile_peer.py mode against a small honest swarm on 127.0.0.1; prints a table.

usage: python scripts/red_team.py [--rounds N] [--timeout S] [MODE ...]     (default: every mode)

Per mode: honest peers a and b (or a, then a late joiner c, for the modes that attack state download or
run records) train with hostile peer x. Columns:
  held      every honest peer exited 0 in time (no stall, no exit), no traceback, and all honest peers hold the
            same adapter after every round they both committed (no tampered or forked result committed)
  named     x's peer id appears in an honest peer's log (console or network.log)
  lost      rounds the honest peers did not apply ("round not applied", the most of any honest peer)
  seconds   wall time of the trial
Every process is started in its own session and killed by process group at the end of its trial.
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
HOSTILE = str(ROOT / "scripts" / "hostile_peer.py")
MODES = ("nan", "huge", "shape", "outlier", "tokens", "speed", "outsider", "sybil", "reducer", "samewrong", "oldrun",
         "state", "optstate", "slowstate", "future", "lure")
JOINER = {"state", "optstate", "slowstate", "future", "lure"}  # attacks on a joiner: a and x train, c joins late


class Swarm:
    def __init__(self, base: Path) -> None:
        self.base, self.procs = base, {}

    def start(self, name: str, *args: str, hostile: str | None = None, peers: list[str] | None = None) -> None:
        out = self.base / name
        out.mkdir(parents=True, exist_ok=True)
        prog = [HOSTILE, hostile] if hostile else ["-m", "swarm.join"]
        cmd = [sys.executable, *prog, "--host", "127.0.0.1", "--output", str(out), "--threads", "1", *args]
        if peers:
            cmd += ["--initial-peers", *peers]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        self.procs[name] = subprocess.Popen(cmd, stdout=open(out / "log.txt", "w"), stderr=subprocess.STDOUT, env=env,
                                            cwd=ROOT, start_new_session=True)

    def log(self, name: str, network: bool = True) -> str:
        text = (self.base / name / "log.txt").read_text(errors="replace")
        net = self.base / name / "network.log"
        return text + (net.read_text(errors="replace") if network and net.exists() else "")

    def addrs(self, name: str, timeout: float = 120) -> list[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.procs[name].poll() is None:
            for line in (self.base / name / "log.txt").read_text(errors="replace").splitlines():
                if line.startswith("initial peers:"):
                    return line.split(":", 1)[1].split()
            time.sleep(0.2)
        raise RuntimeError(f"{name} printed no address")

    def rounds(self, name: str) -> dict[int, str]:
        f = self.base / name / "metrics.jsonl"
        rows = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []
        return {r["round"]: r["adapter_sha256"] for r in rows}

    def kill_all(self) -> None:
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def final_adapter(out: Path) -> str | None:
    from swarm.adapters import adapter_sha256, load_peft_adapter

    try:
        return adapter_sha256(load_peft_adapter(out / "adapter"))
    except Exception:
        return None


def trial(mode: str, rounds: int, timeout: float) -> dict:
    from swarm.transport.hivemind_dht import peer_id_of

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"red-{mode}-") as tmp:
        s = Swarm(Path(tmp))
        honest = ["a", "c"] if mode in JOINER else ["a", "b"]
        try:
            if mode in JOINER:
                n = rounds * 3
                s.start("a", "--max-rounds", str(n), "--min-peers", "2")
                addrs = s.addrs("a")
                s.start("x", "--max-rounds", str(n), hostile=mode, peers=addrs)
                end = time.monotonic() + timeout
                while len(s.rounds("a")) < 2 and time.monotonic() < end and s.procs["a"].poll() is None:
                    time.sleep(0.3)
                s.start("c", "--max-rounds", str(n), peers=addrs)
            else:
                common = ["--max-rounds", str(rounds), "--min-peers", "2" if mode == "outsider" else "3"]
                s.start("a", *common)
                addrs = s.addrs("a")
                s.start("b", *common, peers=addrs)
                if mode == "oldrun":  # b joins the run before the older record is written
                    end = time.monotonic() + 120
                    while "waiting before round 1" not in s.log("b") and time.monotonic() < end:
                        time.sleep(0.3)
                s.start("x", *common, hostile=mode, peers=addrs)
            end = time.monotonic() + timeout
            codes = {}
            for name in honest:
                try:
                    codes[name] = s.procs[name].wait(timeout=max(1.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    codes[name] = None  # stalled
            logs = {n: s.log(n) for n in honest}
            got = {n: s.rounds(n) for n in honest}
            common_rounds = set(got[honest[0]]) & set(got[honest[1]])
            finals = {n: final_adapter(Path(tmp) / n) for n in honest}  # a joiner may only download the final state
            same = all(got[honest[0]][r] == got[honest[1]][r] for r in common_rounds) \
                and len(set(finals.values())) == 1 and None not in finals.values()
            xid = peer_id_of(Path(tmp) / "x" / "identity.key") if (Path(tmp) / "x" / "identity.key").exists() else "?"
            console = [s.log(n, network=False) for n in honest]  # (hivemind's network.log holds tracebacks by design)
            held = all(c == 0 for c in codes.values()) and same and not any("Traceback" in t for t in console)
            if os.environ.get("RED_TEAM_KEEP"):  # keep the peers' logs for a look
                import shutil

                shutil.copytree(tmp, os.environ["RED_TEAM_KEEP"] + f"/{mode}", dirs_exist_ok=True)
            return {"mode": mode, "held": held, "named": any(xid in t for t in logs.values()),
                    "lost": max(t.count("round not applied") for t in console),
                    "exit": ",".join(f"{n}={codes[n]}" for n in honest), "seconds": time.monotonic() - start}
        finally:
            s.kill_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modes", nargs="*", default=list(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds the honest peers get to finish")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: run the finally that kills the peers
    bad = [m for m in a.modes if m not in MODES]
    if bad or a.rounds < 1 or a.timeout <= 0:
        print(f"red_team: unknown mode(s) {bad} (modes: {', '.join(MODES)})" if bad else "red_team: bad --rounds/--timeout",
              file=sys.stderr)
        return 2
    print(f"{'attack':<10} {'held':<5} {'named':<6} {'lost':>4}  {'exit':<12} {'seconds':>7}", flush=True)
    for mode in a.modes:
        r = trial(mode, a.rounds, a.timeout)
        print(f"{r['mode']:<10} {'yes' if r['held'] else 'NO':<5} {'yes' if r['named'] else 'no':<6} {r['lost']:>4}  "
              f"{r['exit']:<12} {r['seconds']:>7.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
