"""Nothing a peer starts outlives it: `guard()` makes every helper process end when the main process dies.

Why. hivemind's DHT and averager are `fork`ed children of the peer and p2pd is a daemon the DHT starts.
None of them notices when the peer's main process dies without running its shutdown (kill -9, the OOM
killer, a crash in native code): they live on with parent 1, ~360 MB each, ignoring SIGTERM, keep
answering in the DHT for a peer that is gone, and, with an `flock`, kept `--output`'s lock, so the
restarted peer was refused its own directory. Nothing in hivemind asks the kernel for a parent-death
signal, and macOS has none to ask for. So:

1. A reaper (this module run as `python -m swarm.lifecycle --reap ...`), a small separate interpreter
   in its own session (a kill of the peer's process group does not take it along; it ignores SIGINT,
   SIGTERM and SIGHUP), holds the read end of a pipe whose write end only the main process holds:
   forked children close their copy at once (`os.register_at_fork`), exec'd ones never get it (every
   fd Python opens is close-on-exec). The kernel closes that write end when main exits, however it
   exits, and the reaper reads EOF. It then stops (SIGSTOP) every process of the peer it knows, and
   their descendants, so none can fork or be reparented while it looks, SIGKILLs them all, and exits.
   It learns of the peer's processes three ways: every fork writes the new pid to a second pipe (the
   DHT, the averager, and p2pd, which uvloop starts with fork hooks run); a scan of main's
   descendants every `SCAN_PERIOD` seconds (anything started by plain exec); and a token in the
   environment (`SWARM_OWNERS`) that exec'd descendants carry even once orphaned (a p2pd whose DHT
   process already died). psutil checks each pid's start time before signalling: a recycled pid is
   never hit. A reaper also exits if main has gone by other means (it looks every scan).
2. On Linux a forked child also asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG),
   the fast path. The kernel sends it when the *thread* that forked exits, so it is set only for forks
   from a main thread (which lives as long as its process): hivemind forks its DHT and averager from
   the thread that creates them (swarm: the main thread) and the DHT starts p2pd from its event loop,
   the main thread of the DHT process, so the chain main -> DHT -> p2pd dies with main.
   `SWARM_REAPER_ONLY=1` turns this path off: the reaper alone, as on macOS (the tests use it).
3. The output lock (`lock_output`) is a POSIX record lock (`fcntl.lockf`): it belongs to the process
   that took it and is never inherited by a fork, so a helper can never hold it.

Bounds: from main's death to no process of the peer left, the reaper needs one pipe wake-up, one pass
over the process table and the kills; the kernel path is immediate. `scripts/bench_kill.py` measured
0.05-0.4 s (goal: 5 s) on a 2-core machine at load 10, the reaper alone (`SWARM_REAPER_ONLY`) included.
Cost while alive: one idle process (~15 MB) and a scan of the process table once per `SCAN_PERIOD`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

OWNERS_ENV = "SWARM_OWNERS"  # space-separated tokens, one per guarded ancestor
SCAN_PERIOD = 1.0            # seconds between scans of main's descendants
KILL_WAIT = 3.0              # after the kills, wait this long for the processes to be gone (then exit anyway)
PR_SET_PDEATHSIG = 1

_log = logging.getLogger("swarm.lifecycle")
_guard_lock = threading.Lock()
_guarded_pid: int | None = None   # the process guard() ran in (a forked child is not guarded by it)
_life_w: int | None = None        # the write end only main holds: its closing is main's death
_report_w: int | None = None      # every forked descendant writes its pid here
_prctl = None                     # libc's prctl (Linux)
_main_ident: int | None = None    # the main thread's id: forks from it may use PR_SET_PDEATHSIG
_forking_pid = 0                  # the pid of the process that is forking (set just before a fork)


def guard() -> None:
    """Start this process's reaper (once per process); every helper it starts from now on ends with it."""
    global _guarded_pid, _life_w, _report_w, _prctl, _main_ident
    if sys.platform == "win32":
        return
    with _guard_lock:
        if _guarded_pid == os.getpid():
            return
        token = f"{os.getpid()}-{os.urandom(6).hex()}"
        life_r, life_w = os.pipe()
        report_r, report_w = os.pipe()
        os.set_blocking(report_w, False)  # a fork hook never blocks on a full pipe
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
        try:
            subprocess.Popen([sys.executable, "-m", "swarm.lifecycle", "--reap", str(os.getpid()), str(life_r),
                              str(report_r), token], pass_fds=(life_r, report_r), env=env, start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as e:  # no reaper: the peer still works, its helpers just may outlive a kill -9
            _log.warning("could not start the reaper: %s", e)
            for fd in (life_r, life_w, report_r, report_w):
                os.close(fd)
            return
        os.close(life_r)
        os.close(report_r)
        for fd in (_life_w, _report_w):  # a guarded process that forked and guards its child again
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        _life_w, _report_w = life_w, report_w
        # descendants started by exec carry the token, even once orphaned; the reaper itself does not
        os.environ[OWNERS_ENV] = " ".join(os.environ.get(OWNERS_ENV, "").split() + [token])
        if sys.platform.startswith("linux") and _prctl is None and not os.environ.get("SWARM_REAPER_ONLY"):
            try:
                import ctypes

                _prctl = ctypes.CDLL(None, use_errno=True).prctl
            except Exception:
                _prctl = None
        _main_ident = threading.main_thread().ident
        if _guarded_pid is None:
            os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _guarded_pid = os.getpid()


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    """Runs in every forked child (also between fork and exec when uvloop starts p2pd). Never raises."""
    global _life_w
    try:
        if _life_w is not None:  # only main may hold the write end
            os.close(_life_w)
            _life_w = None
    except OSError:
        _life_w = None
    if _report_w is not None:
        try:
            os.write(_report_w, b"%d\n" % os.getpid())
        except OSError:
            pass
    if _prctl is not None and threading.get_ident() == _main_ident:  # forked by a main thread: safe
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != _forking_pid:  # the parent died before the kernel was asked
                os.kill(os.getpid(), signal.SIGKILL)
        except Exception:
            pass


# --------------------------------------------------------------------------------------------- lock
def lock_output(path: Path) -> IO | None:
    """The exclusive lock on `path` (created), held by this process only, or None if another process holds it.

    A POSIX record lock: not inherited by forked children (hivemind's processes never hold it) and gone
    the moment its owner dies, so a peer restarted right after a kill -9 gets its directory back.
    """
    f = open(path, "a")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def unlock_output(f: IO | None) -> None:
    if f is None:
        return
    try:
        fcntl.lockf(f, fcntl.LOCK_UN)
    except OSError:
        pass
    f.close()


# ------------------------------------------------------------------------------------------- reaper
class Reaper:
    """Watches one main process; when it dies, kills everything of it that is left."""

    def __init__(self, main_pid: int, life_r: int, report_r: int, token: str) -> None:
        import psutil

        self.psutil = psutil
        self.life_r, self.report_r, self.token = life_r, report_r, token
        self.me = os.getpid()
        self.known: dict[int, "psutil.Process"] = {}
        try:
            self.main = psutil.Process(main_pid)
            self.since = self.main.create_time() - 1.0
        except psutil.Error:
            self.main, self.since = None, time.time() - 60.0

    def _add(self, pid: int) -> None:
        if pid in (self.me, 0, 1) or (self.main is not None and pid == self.main.pid) or pid in self.known:
            return
        try:
            p = self.psutil.Process(pid)
            if p.create_time() >= self.since:  # never older than main: not a recycled pid of someone else
                self.known[pid] = p
        except self.psutil.Error:
            pass

    def _read_reports(self) -> None:
        try:
            data = os.read(self.report_r, 65536)
        except (BlockingIOError, InterruptedError):
            return
        for word in data.split():
            if word.isdigit():
                self._add(int(word))

    def _children_map(self) -> dict[int, list[int]]:
        kids: dict[int, list[int]] = {}
        for p in self.psutil.process_iter(["ppid"]):
            ppid = p.info.get("ppid")
            if ppid is not None:
                kids.setdefault(ppid, []).append(p.pid)
        return kids

    def _descendants(self, roots: list[int], kids: dict[int, list[int]]) -> set[int]:
        seen, todo = set(), list(roots)
        while todo:
            for c in kids.get(todo.pop(), ()):
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        return seen

    def scan(self) -> None:
        """Add main's and known processes' descendants; forget the dead."""
        for pid, p in list(self.known.items()):
            if not p.is_running():
                del self.known[pid]
        roots = list(self.known) + ([self.main.pid] if self.main is not None and self.main.is_running() else [])
        for pid in self._descendants(roots, self._children_map()):
            self._add(pid)

    def _carrying_token(self) -> list[int]:
        found, uid = [], os.getuid()
        for p in self.psutil.process_iter(["uids", "create_time"]):
            try:
                if p.pid == self.me or p.info["uids"] is None or p.info["uids"].real != uid:
                    continue
                if (p.info["create_time"] or 0) < self.since:
                    continue
                if self.token in p.environ().get(OWNERS_ENV, "").split():
                    found.append(p.pid)
            except (self.psutil.Error, OSError):
                pass
        return found

    def main_alive(self) -> bool:
        return self.main is not None and _alive(self.main)

    def watch(self) -> None:
        """Until main dies: collect its processes."""
        next_scan = 0.0
        while True:
            timeout = max(0.0, next_scan - time.monotonic())
            try:
                ready, _, _ = select.select([self.life_r, self.report_r], [], [], timeout)
            except InterruptedError:
                continue
            if self.report_r in ready:
                self._read_reports()
            if self.life_r in ready:
                if os.read(self.life_r, 1) == b"":  # main never writes: this is EOF, main is gone
                    return
            if time.monotonic() >= next_scan:
                if not self.main_alive():
                    return
                try:
                    self.scan()
                except self.psutil.Error:
                    pass
                next_scan = time.monotonic() + SCAN_PERIOD

    def reap(self) -> int:
        """Stop every process left of main's, and their descendants, then kill them all. Returns how many."""
        self._read_reports()
        stopped: dict[int, "psutil.Process"] = {}
        for _ in range(10):  # bounded: each pass stops what the last one found, until nothing new appears
            kids = self._children_map()
            for pid in self._carrying_token():
                self._add(pid)
            for pid in self._descendants(list(self.known), kids):
                self._add(pid)
            new = [p for pid, p in self.known.items() if pid not in stopped]
            if not new:
                break
            for p in new:
                stopped[p.pid] = p
                try:
                    p.suspend()  # checks the pid's start time: never a recycled pid
                except self.psutil.Error:
                    pass
        for p in stopped.values():
            try:
                p.kill()
            except self.psutil.Error:
                pass
        end = time.monotonic() + KILL_WAIT  # gone or a zombie (pid 1 reaps those when it gets to it)
        while time.monotonic() < end and any(_alive(p) for p in stopped.values()):
            time.sleep(0.02)
        return len(stopped)


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap_main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] != "--reap" or not all(a.isdigit() for a in argv[1:4]):
        print("usage: python -m swarm.lifecycle --reap MAIN_PID LIFE_FD REPORT_FD TOKEN "
              "(internal: started by swarm.lifecycle.guard)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only main's death ends a reaper
    reaper = Reaper(int(argv[1]), int(argv[2]), int(argv[3]), argv[4])
    os.set_blocking(reaper.report_r, False)
    reaper.watch()
    reaper.reap()
    return 0


if __name__ == "__main__":
    sys.exit(_reap_main(sys.argv[1:]))
