"""Background mode: train only while the machine's owner isn't using it.

`--background` lowers this peer's CPU and I/O priority (nice 19, the idle I/O class where the OS
has one), and pauses training while other processes keep the CPU busy (or the machine runs on
battery), resuming once it has been quiet for a while. A paused peer advertises `paused`, so
every peer's plan moves its quota to the others; on resume it catches up and rejoins the plan.
Pausing is normal operation, never an error.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    busy_above: float = 0.5      # pause when other processes use more than this fraction of all cores...
    busy_for: int = 3            # ...for this many consecutive samples
    quiet_below: float = 0.25    # resume when they use less than this...
    quiet_for: int = 5           # ...for this many consecutive samples
    pause_on_battery: bool = True


def decide(paused: bool, other_load: list[float], on_battery: bool | None, policy: Policy) -> bool:
    """Pure: should the peer be paused, given recent samples of other processes' CPU load (0..1, newest last)?"""
    if policy.pause_on_battery and on_battery:
        return True
    if not paused:
        recent = other_load[-policy.busy_for:]
        return len(recent) == policy.busy_for and all(x > policy.busy_above for x in recent)
    recent = other_load[-policy.quiet_for:]
    return not (len(recent) == policy.quiet_for and all(x < policy.quiet_below for x in recent))


def lower_priority() -> str:
    """nice 19 and the idle I/O class (Linux); says what it did."""
    import psutil

    done = []
    try:
        os.nice(19 - os.nice(0))
        done.append("nice 19")
    except OSError:
        pass
    try:
        if hasattr(psutil, "IOPRIO_CLASS_IDLE"):
            psutil.Process().ionice(psutil.IOPRIO_CLASS_IDLE)
            done.append("idle I/O class")
        elif hasattr(psutil.Process(), "ionice"):
            psutil.Process().ionice(0)  # Windows: very low
            done.append("low I/O priority")
    except (OSError, psutil.Error):
        pass
    return ", ".join(done) or "priority unchanged"


class Monitor:
    """Samples other processes' CPU load once a second and flips `paused` by `decide`."""

    def __init__(self, policy: Policy = Policy(), on_change=None, period: float = 1.0) -> None:
        self.policy, self.on_change, self.period = policy, on_change, period
        self.paused = False
        self.samples: deque[float] = deque(maxlen=32)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="background-monitor", daemon=True)

    def start(self) -> "Monitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> tuple[float, bool | None]:
        import psutil

        cores = psutil.cpu_count() or 1
        total = psutil.cpu_percent(interval=None) / 100.0            # all cores, 0..1
        mine = sum(_tree_cpu(psutil.Process())) / 100.0 / cores       # this peer and its children
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        return max(0.0, total - mine), (not battery.power_plugged) if battery is not None else None

    def _loop(self) -> None:
        self.sample()  # prime psutil's counters
        while not self._stop.wait(self.period):
            try:
                load, on_battery = self.sample()
            except Exception:
                continue
            self.samples.append(load)
            now = decide(self.paused, list(self.samples), on_battery, self.policy)
            if now != self.paused:
                self.paused = now
                if self.on_change:
                    self.on_change(now, load, on_battery)


_procs: dict[int, object] = {}


def _tree_cpu(root) -> list[float]:
    """cpu_percent of a process and its children, keeping Process objects so each reading is a delta."""
    import psutil

    out = []
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return out
    for p in procs:
        cached = _procs.setdefault(p.pid, p)
        try:
            out.append(cached.cpu_percent(interval=None))
        except psutil.Error:
            _procs.pop(p.pid, None)
    return out


def busy_now(other_load: float) -> str:
    return f"other processes use {other_load:.0%} of the CPU"


def wait_while(paused, stop, poll: float = 0.5) -> None:
    while paused() and not stop():
        time.sleep(poll)
