"""kill -9 of a peer's main process only: how long until nothing of it is left, and how long its restart
(same --output, at once) takes to contribute a round again. Real processes on 127.0.0.1.

One live swarm (tiny config): peers a, b, c, a DHT-only bootstrap node they restart through, then:
  mid all-reduce  c's main process dies once its round-3 group formed (SWARM_CHAOS_DIE_AT=reduce, KILL=main)
  training        b's main process is killed right after it completed a round
  start-up        a new peer e is killed once its DHT and p2pd are up, before its first round
  serving state   the peer a joiner d downloads state from dies as it serves (SWARM_CHAOS_DIE_SERVING)
then, on their own: a testbed of 2 peers (the testbed process is killed) and swarm.status (killed mid-read).
"gone" is from the kill (or the observed death) until no descendant of the main process is alive;
"restart" from relaunching to the first metrics line of a new round.

Usage: python scripts/bench_kill.py [--output DIR]
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

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarm.lifecycle import guard  # noqa: E402
from swarm.metrics import read_metrics  # noqa: E402

TINY = str(ROOT / "configs" / "tiny.yaml")
BOOTSTRAP = ("import sys, time; from swarm.transport.hivemind_dht import HivemindTransport; "
             "t = HivemindTransport(host='127.0.0.1', initial_peers=sys.argv[1:]); "
             "print('initial peers: ' + ' '.join(t.visible_maddrs()), flush=True); time.sleep(3600)")


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise SystemExit(f"bench_kill: {what} within {timeout:.0f}s")


class Procs:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}
        self.family: dict[str, dict[int, psutil.Process]] = {}
        self.started: dict[str, float] = {}
        self.all: list[psutil.Process] = []  # everything seen, killed by PID at the end

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def spawn(self, name: str, cmd: list[str], **extra_env) -> subprocess.Popen:
        d = self.base / name
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "log.txt", "w") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(**extra_env), cwd=ROOT,
                                 start_new_session=True)
        self.procs[name], self.family[name], self.started[name] = p, {}, time.monotonic()
        self.all.append(psutil.Process(p.pid))
        return p

    def peer(self, name: str, initial_peers: list[str] | None, *extra: str, **extra_env) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "swarm.join", "--host", "127.0.0.1", "--output", str(self.base / name),
               "--threads", "1", "--config", TINY, "--max-rounds", "100000", *extra]
        return self.spawn(name, cmd + (["--initial-peers", *initial_peers] if initial_peers else []), **extra_env)

    def log(self, name: str) -> str:
        return (self.base / name / "log.txt").read_text(errors="replace")

    def addrs(self, name: str) -> list[str]:
        found: list[str] = []

        def up():
            if self.procs[name].poll() is not None:
                raise SystemExit(f"bench_kill: {name} exited:\n{self.log(name)[-2000:]}")
            found.extend(l.split(":", 1)[1].split() for l in self.log(name).splitlines() if l.startswith("initial peers:"))
            return bool(found)

        wait_for(up, 120, f"{name} printed no address")
        return found[0]

    def collect(self, name: str) -> None:
        try:
            for c in psutil.Process(self.procs[name].pid).children(recursive=True):
                if c.pid not in self.family[name]:
                    self.family[name][c.pid] = c
                    self.all.append(c)
        except psutil.Error:
            pass

    def names(self, name: str) -> list[str]:
        return [p.name() for p in self.family[name].values() if alive(p)]

    def rounds(self, name: str) -> int:
        return len(read_metrics(self.base / name / "metrics.jsonl"))

    def gone_seconds(self, name: str, since: float, bound: float = 30.0) -> float:
        end = time.monotonic() + bound
        while time.monotonic() < end:
            if not any(alive(p) for p in self.family[name].values()):
                return time.monotonic() - since
            time.sleep(0.005)
        return float("inf")

    def kill_main(self, name: str) -> tuple[float, int]:
        self.collect(name)
        t = time.monotonic()
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()
        return self.gone_seconds(name, t), len(self.family[name])

    def wait_death(self, names: list[str], timeout: float) -> tuple[str, float]:
        end = time.monotonic() + timeout
        last_collect = 0.0
        while time.monotonic() < end:
            for n in names:
                if self.procs[n].poll() is not None:
                    return n, time.monotonic()
            if time.monotonic() - last_collect > 0.5:
                for n in names:
                    self.collect(n)
                last_collect = time.monotonic()
            time.sleep(0.003)
        raise SystemExit(f"bench_kill: none of {names} died within {timeout:.0f}s")

    def restart(self, name: str, initial_peers: list[str], timeout: float = 300) -> tuple[float, str]:
        before = self.rounds(name)
        t = time.monotonic()
        p = self.peer(name, initial_peers)
        wait_for(lambda: self.rounds(name) > before or p.poll() is not None, timeout, f"restarted {name} trained no round")
        if p.poll() is not None:
            raise SystemExit(f"bench_kill: restarted {name} exited:\n{self.log(name)[-2000:]}")
        log = self.log(name)
        how = " + ".join(w for k, w in (("resuming from checkpoint", "resumed from checkpoint"),
                                         ("downloaded state of round", "downloaded state")) if k in log) or "started fresh"
        return time.monotonic() - t, how

    def kill_everything(self) -> None:
        for p in self.all:
            try:
                if alive(p):
                    p.kill()
            except psutil.Error:
                pass


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: unwind, so child processes are stopped
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=None, help="where peers write (default: a temporary directory)")
    args = ap.parse_args()
    guard()  # a killed bench leaves no peer behind either
    base = Path(args.output or tempfile.mkdtemp(prefix="bench-kill-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    flag = base / "die-serving"
    ps = Procs(base)
    rows: list[dict] = []
    try:
        os.environ["SWARM_CHAOS_DIE_SERVING"] = str(flag)  # every peer, restarts too; armed once the flag exists
        ps.peer("a", None, "--min-peers", "3")
        addrs = ps.addrs("a")
        ps.spawn("boot", [sys.executable, "-c", BOOTSTRAP, *addrs])
        boot = ps.addrs("boot")
        ps.peer("b", addrs, "--min-peers", "3")
        ps.peer("c", addrs, "--min-peers", "3", SWARM_CHAOS_DIE_IN_ROUND="3", SWARM_CHAOS_DIE_AT="reduce",
                SWARM_CHAOS_KILL="main")

        name, died = ps.wait_death(["c", "a", "b"], 300)
        if name != "c":
            raise SystemExit(f"bench_kill: {name} died instead of c:\n{ps.log(name)[-2000:]}")
        gone, n = ps.gone_seconds("c", died), len(ps.family["c"])
        took, how = ps.restart("c", boot)
        rows.append(dict(moment="mid all-reduce", processes=n, gone_s=gone, restart_to_round_s=took, restart=how))

        before = ps.rounds("b")
        wait_for(lambda: ps.rounds("b") > before, 120, "b trained no round")
        gone, n = ps.kill_main("b")
        took, how = ps.restart("b", boot)
        rows.append(dict(moment="training", processes=n, gone_s=gone, restart_to_round_s=took, restart=how))

        ps.peer("e", boot)

        def dht_up():
            ps.collect("e")
            if ps.rounds("e"):
                raise SystemExit("bench_kill: e trained before it could be killed at start-up")
            return "p2pd" in ps.names("e")

        wait_for(dht_up, 120, "e's DHT did not start")
        gone, n = ps.kill_main("e")
        took, how = ps.restart("e", boot)
        rows.append(dict(moment="start-up", processes=n, gone_s=gone, restart_to_round_s=took, restart=how))

        flag.touch()
        ps.peer("d", boot)
        name, died = ps.wait_death(["a", "b", "c", "e"], 180)
        gone, n = ps.gone_seconds(name, died), len(ps.family[name])
        took, how = ps.restart(name, boot)
        rows.append(dict(moment=f"serving state ({name})", processes=n, gone_s=gone, restart_to_round_s=took, restart=how))

        ps.spawn("status", [sys.executable, "-m", "swarm.status", "--initial-peers", *boot, "--wait", "120"])

        def status_up():
            ps.collect("status")
            return "p2pd" in ps.names("status")

        wait_for(status_up, 60, "swarm.status's DHT did not start")
        gone, n = ps.kill_main("status")
        rows.append(dict(moment="swarm.status", processes=n, gone_s=gone, restart_to_round_s=None, restart=""))
    finally:
        ps.kill_everything()
        os.environ.pop("SWARM_CHAOS_DIE_SERVING", None)

    bed = base / "bed"
    ps.spawn("testbed", [sys.executable, "-m", "swarm.testbed", "--peers", "2", "--max-rounds", "100000", "--config",
                         TINY, "--threads", "1", "--output", str(bed)])
    try:
        def trained():
            ps.collect("testbed")
            return all(read_metrics(bed / f"peer{k}" / "metrics.jsonl") for k in range(2))

        wait_for(trained, 300, "the testbed's peers trained no round")
        gone, n = ps.kill_main("testbed")
        rows.append(dict(moment="testbed (2 peers)", processes=n, gone_s=gone, restart_to_round_s=None, restart=""))
    finally:
        ps.kill_everything()

    print(f"{'moment':<24}{'processes':>10}{'gone (s)':>10}{'restart -> round (s)':>22}  restart")
    for r in rows:
        took = f"{r['restart_to_round_s']:.1f}" if r["restart_to_round_s"] is not None else "-"
        print(f"{r['moment']:<24}{r['processes']:>10}{r['gone_s']:>10.3f}{took:>22}  {r['restart']}")
    print(json.dumps({"rows": rows, "output": str(base)}))
    return 0 if all(r["gone_s"] <= 5.0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
