"""kill -9 of a peer's main process only (never its process group) leaves nothing behind, and the peer
restarted at once with the same --output resumes. Real processes on 127.0.0.1; the moments: start-up
(DHT up, not training), training, mid all-reduce, serving state to a joiner; plus a killed testbed and a
killed swarm.status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, _env, metrics, run_cli

TINY = str(ROOT / "configs" / "tiny.yaml")
GONE_WITHIN = 5.0  # seconds from the kill until no process of the peer is left


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Family:
    """A main process and every process it started (its descendants, collected while it lives)."""

    def __init__(self, pid: int) -> None:
        self.main = psutil.Process(pid)
        self.procs: dict[int, psutil.Process] = {}
        self.labels: dict[int, str] = {}
        self.collect()

    def collect(self) -> None:
        try:
            children = self.main.children(recursive=True)
        except psutil.Error:
            return
        for p in children:
            self.procs.setdefault(p.pid, p)
            try:  # labelled again each time: a child seen between its fork and its exec (p2pd) changes name
                self.labels[p.pid] = "reaper" if "swarm.lifecycle" in p.cmdline() else (
                    "python (hivemind)" if p.name().startswith("python") else p.name())
            except psutil.Error:
                pass

    def names(self) -> list[str]:
        return sorted(self.labels.values())

    def seconds_until_gone(self, since: float, bound: float = 30.0) -> float:
        """Seconds from `since` (time.monotonic()) until none of the family is alive (bounded)."""
        end = time.monotonic() + bound
        while time.monotonic() < end:
            if not any(_alive(p) for p in self.procs.values()):
                return time.monotonic() - since
            time.sleep(0.02)
        left = [(p.pid, p.name()) for p in self.procs.values() if _alive(p)]
        raise AssertionError(f"still alive {bound:.0f}s after the kill: {left}")

    def kill_rest(self) -> None:
        for p in [self.main, *self.procs.values()]:
            try:
                if _alive(p):
                    p.kill()
            except psutil.Error:
                pass


@pytest.fixture
def families():
    """Every family a test watched; whatever of it is left is killed by PID at teardown, even on failure."""
    found: list[Family] = []
    yield found
    for f in found:
        f.kill_rest()


def _watch(families, pid: int) -> Family:
    f = Family(pid)
    families.append(f)
    return f


def _kill_main(family: Family) -> float:
    """SIGKILL the main process only; seconds until no process of its family is left."""
    family.collect()
    t = time.monotonic()
    os.kill(family.main.pid, signal.SIGKILL)
    return family.seconds_until_gone(t)


def _wait_for(cond, timeout: float, what: str, log=lambda: "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f}s\n{log()[-3000:]}")


def _rounds(peers, name) -> list[int]:
    return [m["round"] for m in metrics(peers.base / name / "metrics.jsonl")]


def _wait_rounds(peers, name, n, timeout=240) -> None:
    def done():
        if peers.procs[name].poll() is not None:
            raise AssertionError(f"{name} exited:\n{peers.log(name)[-3000:]}")
        return len(_rounds(peers, name)) >= n

    _wait_for(done, timeout, f"{name} did not reach {n} rounds", lambda: peers.log(name))


def _restart_resumes(peers, name, *args, initial_peers=None, timeout=240) -> float:
    """Restart `name` with the same --output at once; it resumes (checkpoint or downloaded state) and
    contributes a round. Returns seconds from the restart to that round."""
    before = len(_rounds(peers, name))
    t = time.monotonic()
    peers.start(name, *args, initial_peers=initial_peers)
    _wait_rounds(peers, name, before + 1, timeout)
    took = time.monotonic() - t
    log = peers.log(name)
    assert "in use by another peer" not in log
    assert "resuming from checkpoint" in log or "downloaded state of round" in log, log[-3000:]
    return took


def _wait_death(peers, names, families, timeout) -> str:
    """Keep collecting the families of `names` until one's main process exits; return its name."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for n in names:
            families[n].collect()
            if peers.procs[n].poll() is not None:
                return n
        time.sleep(0.05)
    raise AssertionError(f"none of {names} died within {timeout:.0f}s")


# a guarded process with a forked child (from the main thread), a child forked from another thread, an
# exec'd grandchild, and the output lock; prints their pids and PR_GET_PDEATHSIG as the children saw it
GUARDED = r"""
import os, sys, threading, time, subprocess
from pathlib import Path
from swarm.lifecycle import guard, lock_output
guard()
lock = lock_output(Path(sys.argv[1]))
assert lock is not None
r, w = os.pipe()

def child():
    pid = os.fork()
    if pid == 0:
        sig = -1
        if sys.platform.startswith("linux"):
            import ctypes
            v = ctypes.c_int(0)
            ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0)  # PR_GET_PDEATHSIG
            sig = v.value
        sub = subprocess.Popen(["sleep", "60"])  # exec'd: no fork hook runs in it
        os.write(w, f"{os.getpid()} {sig} {sub.pid}\n".encode())
        time.sleep(60)
        os._exit(0)

child()
t = threading.Thread(target=child)
t.start()
t.join()
lines = []
while len(lines) < 2:
    lines += [l for l in os.read(r, 4096).decode().splitlines() if l]
print("\n".join(lines), flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["kill", "exit", "kill-reaper-only"])
def test_guarded_helpers_end_with_main(tmp_path, families, how):
    env = _env()
    if how == "kill-reaper-only":
        env["SWARM_REAPER_ONLY"] = "1"
    p = subprocess.Popen([sys.executable, "-c", GUARDED, str(tmp_path / ".lock"), how.split("-")[0]],
                         stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True)
    try:
        fam = _watch(families, p.pid)
        lines = [p.stdout.readline().split() for _ in range(2)]
        fam.collect()
        assert len(fam.procs) == 5, fam.names()  # reaper, 2 children, 2 exec'd grandchildren
        if sys.platform.startswith("linux"):
            want = 0 if how == "kill-reaper-only" else signal.SIGKILL
            assert sorted(int(sig) for _, sig, _ in lines) == sorted([want, 0])  # only the main-thread fork
        if how == "exit":
            assert p.wait(10) == 0
            gone = fam.seconds_until_gone(time.monotonic())
        else:
            gone = _kill_main(fam)
        assert gone <= GONE_WITHIN
        from swarm.lifecycle import lock_output, unlock_output

        lock = lock_output(tmp_path / ".lock")  # no helper kept the lock
        assert lock is not None
        unlock_output(lock)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()


@pytest.mark.slow
def test_kill_at_start_up_status_and_restart(peers, families, tmp_path, monkeypatch):
    common = ["--config", TINY, "--max-rounds", "1", "--min-peers", "2"]
    monkeypatch.setenv("SWARM_REAPER_ONLY", "1")  # no PR_SET_PDEATHSIG: the reaper alone, as on macOS
    peers.start("a", *common)  # waits for a second peer: DHT up, not training
    peers.addrs("a")
    fam = _watch(families, peers.procs["a"].pid)
    _wait_for(lambda: fam.collect() or "p2pd" in fam.names(), 60, "a's p2pd did not show up", lambda: peers.log("a"))
    # a genuinely running peer keeps its --output: one line, non-zero exit
    res = run_cli("swarm.join", "--host", "127.0.0.1", "--output", str(peers.base / "a"), "--config", TINY, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert [l for l in res.stderr.splitlines() if l.strip()] == [
        f"error: output directory {peers.base / 'a'} is in use by another peer: give this one its own --output"]

    gone = _kill_main(fam)
    print(f"start-up: no process left {gone:.2f}s after kill -9 of the main process ({', '.join(fam.names())})")
    assert gone <= GONE_WITHIN
    assert peers.procs["a"].wait(5) == -signal.SIGKILL

    peers.start("a", *common)  # at once, same --output: not "in use"
    addrs = peers.addrs("a")

    # swarm.status: its DHT and p2pd go with it too
    status = subprocess.Popen([sys.executable, "-m", "swarm.status", "--initial-peers", *addrs, "--wait", "120"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT,
                              start_new_session=True)
    try:
        sfam = _watch(families, status.pid)
        _wait_for(lambda: sfam.collect() or "p2pd" in sfam.names(), 60, "swarm.status's p2pd did not show up")
        gone = _kill_main(sfam)
        print(f"swarm.status: no process left {gone:.2f}s after kill -9 ({', '.join(sfam.names())})")
        assert gone <= GONE_WITHIN
    finally:
        if status.poll() is None:
            status.kill()
        status.wait()

    monkeypatch.delenv("SWARM_REAPER_ONLY")
    peers.start("b", *common, initial_peers=addrs)  # the restarted peer trains a round with b and finishes
    for name in "ab":
        assert peers.wait(name, 240) == 0, peers.log(name)[-3000:]
    assert _rounds(peers, "a") == [1] == _rounds(peers, "b")


# a node of the transport (argv[1]) that trains nothing: whichever peer dies, it restarts through this one
BOOTSTRAP = ("import sys, time; from swarm.transport.factory import make_transport; "
             "t = make_transport(sys.argv[1], host='127.0.0.1', initial_peers=sys.argv[2:]); "
             "print('initial peers: ' + ' '.join(t.visible_maddrs()), flush=True); time.sleep(900)")


def _bootstrap(tmp_path, families, initial_peers, transport="hivemind") -> list[str]:
    log = tmp_path / "bootstrap.txt"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-c", BOOTSTRAP, transport, *initial_peers], stdout=f, stderr=subprocess.STDOUT,
                             env=_env(), cwd=ROOT, start_new_session=True)
    _watch(families, p.pid)
    found: list[str] = []

    def up():
        assert p.poll() is None, log.read_text()
        found.extend(l.split(":", 1)[1].split() for l in log.read_text().splitlines() if l.startswith("initial peers:"))
        return bool(found)

    _wait_for(up, 60, "the bootstrap node did not start", log.read_text)
    return found[0]


@pytest.mark.slow
def test_kill_while_training_mid_all_reduce_and_serving_state(peers, families, tmp_path, monkeypatch, transport):
    flag = tmp_path / "die-serving"  # whoever takes it dies (main process only) as it serves a state download
    monkeypatch.setenv("SWARM_CHAOS_DIE_SERVING", str(flag))
    common = ["--config", TINY, "--max-rounds", "1000"]  # runs until the test ends it
    peers.start("a", *common, "--min-peers", "3")
    addrs = peers.addrs("a")
    boot = _bootstrap(tmp_path, families, addrs, transport)
    peers.start("b", *common, "--min-peers", "3", initial_peers=addrs)
    monkeypatch.setenv("SWARM_CHAOS_DIE_IN_ROUND", "2")  # c's main process dies in round 2's all-reduce,
    monkeypatch.setenv("SWARM_CHAOS_DIE_AT", "reduce")    # once its group formed and parts are being exchanged
    monkeypatch.setenv("SWARM_CHAOS_KILL", "main")
    peers.start("c", *common, "--min-peers", "3", initial_peers=addrs)
    for var in ("SWARM_CHAOS_DIE_IN_ROUND", "SWARM_CHAOS_DIE_AT", "SWARM_CHAOS_KILL"):
        monkeypatch.delenv(var)
    fams = {n: _watch(families, peers.procs[n].pid) for n in "abc"}

    # mid all-reduce
    assert _wait_death(peers, ["c", "a", "b"], fams, 240) == "c", peers.log("c")[-3000:]
    t = time.monotonic()
    assert peers.procs["c"].wait(5) == -signal.SIGKILL
    gone = fams["c"].seconds_until_gone(t)
    print(f"mid all-reduce: no process left {gone:.2f}s after c's main process died ({', '.join(fams['c'].names())})")
    assert gone <= GONE_WITHIN
    assert ("p2pd" in fams["c"].names()) == (transport == "hivemind")  # tcp: no daemon at all
    took = _restart_resumes(peers, "c", *common, initial_peers=boot)
    print(f"mid all-reduce: restart -> first contributed round {took:.1f}s")
    fams["c"] = _watch(families, peers.procs["c"].pid)

    # training (just after a round: the next one is being planned and trained)
    _wait_rounds(peers, "b", len(_rounds(peers, "b")) + 1)
    gone = _kill_main(fams["b"])
    print(f"training: no process left {gone:.2f}s after kill -9 of b's main process ({', '.join(fams['b'].names())})")
    assert gone <= GONE_WITHIN
    took = _restart_resumes(peers, "b", *common, initial_peers=boot)
    print(f"training: restart -> first contributed round {took:.1f}s")
    fams["b"] = _watch(families, peers.procs["b"].pid)

    # serving state to a joiner: the peer d downloads from dies mid-request
    flag.touch()
    peers.start("d", *common, initial_peers=boot)
    victim = _wait_death(peers, ["a", "b", "c"], fams, 180)
    t = time.monotonic()
    assert not flag.exists() and peers.procs[victim].wait(5) == -signal.SIGKILL
    gone = fams[victim].seconds_until_gone(t)
    print(f"serving state: no process left {gone:.2f}s after {victim}'s main process died ({', '.join(fams[victim].names())})")
    assert gone <= GONE_WITHIN
    took = _restart_resumes(peers, victim, *common, initial_peers=boot)
    print(f"serving state: restart -> first contributed round {took:.1f}s")
    _wait_rounds(peers, "d", 1)  # the joiner got the state from another peer and trains
    assert "downloaded state of round" in peers.log("d")


@pytest.mark.slow
def test_killed_testbed_leaves_no_peer(tmp_path, families):
    out = tmp_path / "bed"
    bed = subprocess.Popen([sys.executable, "-m", "swarm.testbed", "--peers", "2", "--max-rounds", "60", "--config", TINY,
                            "--threads", "1", "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=_env(), cwd=ROOT, start_new_session=True)
    try:
        fam = _watch(families, bed.pid)

        def trained():
            fam.collect()
            if bed.poll() is not None:
                raise AssertionError(f"the testbed exited with {bed.returncode}")
            return all(len(metrics(out / f"peer{k}" / "metrics.jsonl")) >= 1 for k in range(2))

        _wait_for(trained, 240, "the testbed's peers did not train a round",
                  lambda: "".join(Path(out / f"peer{k}" / "log.txt").read_text(errors="replace") for k in range(2)))
        assert sum(n.startswith("p2pd") for n in fam.names()) == 2
        gone = _kill_main(fam)
        print(f"testbed: no process left {gone:.2f}s after kill -9 of the testbed ({len(fam.procs)} processes)")
        assert gone <= GONE_WITHIN
    finally:
        if bed.poll() is None:
            bed.kill()
        bed.wait()
