"""Shared fixtures: one model/corpus cache per session, and real peer processes cleaned up by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def swarm_cache(tmp_path_factory):
    """Generated models, tokenized corpora and throughput figures live in one per-session cache."""
    path = tmp_path_factory.mktemp("swarm-cache")
    old = os.environ.get("SWARM_CACHE")
    os.environ["SWARM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SWARM_CACHE", None)
    else:
        os.environ["SWARM_CACHE"] = old


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m module args` to completion (bounded), capturing output; on timeout the whole
    process group (hivemind's daemons included) is killed."""
    cmd = [sys.executable, "-m", module, *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{' '.join(cmd[2:])} did not finish in {timeout}s:\n{out[-2000:]}\n{err[-2000:]}") from None
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # stray daemons of a finished command
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


TRANSPORTS = ("hivemind", "tcp")


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    """Opt-in: a test that asks for it runs once per transport, and `peers` starts every peer with `--transport X`."""
    return request.param


def transport_args(transport: str) -> list[str]:
    """The flag for a command of `swarm.join`/`swarm.testbed`/`swarm.status` (none for hivemind, the default)."""
    return [] if transport == "hivemind" else ["--transport", transport]


def identity_of(output: Path, transport: str = "hivemind") -> str:
    """The peer id of the peer whose --output is `output`, from the identity file its transport keeps there."""
    if transport == "tcp":
        from swarm.transport.tcp.identity import load_or_create

        path = output / "identity.ed25519"
        assert path.is_file(), path  # never create one here
        return load_or_create(path).peer_id
    from swarm.transport.hivemind_dht import peer_id_of

    return peer_id_of(output / "identity.key")


class Peers:
    """Peer processes started by a test; every one is killed (by process group) at teardown."""

    def __init__(self, base: Path, transport: str = "hivemind") -> None:
        self.base = base
        self.transport = transport
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, initial_peers: list[str] | None = None,
              program: list[str] | None = None) -> subprocess.Popen:
        """`program`: what runs instead of `python -m swarm.join` (e.g. a hostile peer script), same arguments."""
        out = self.base / name
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, *(program or ["-m", "swarm.join"]), "--host", "127.0.0.1", "--output", str(out),
               "--threads", "1", *transport_args(self.transport), *args]
        if initial_peers:
            cmd += ["--initial-peers", *initial_peers]
        log = open(out / "log.txt", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.base / name / "log.txt").read_text(errors="replace")

    def addrs(self, name: str, timeout: float = 90) -> list[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.log(name).splitlines():
                if line.startswith("initial peers:"):
                    return line.split(":", 1)[1].split()
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited early:\n{self.log(name)}")
            time.sleep(0.2)
        raise AssertionError(f"{name} printed no address in {timeout}s:\n{self.log(name)}")

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not finish in {timeout}s:\n{self.log(name)[-3000:]}") from None

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


@pytest.fixture
def peers(request, tmp_path):
    """Peers over hivemind, or over the `transport` fixture's transport where the test asks for it."""
    transport = request.getfixturevalue("transport") if "transport" in request.fixturenames else "hivemind"
    group = Peers(tmp_path, transport)
    yield group
    group.kill_all()


def metrics(path: Path) -> list[dict]:
    from swarm.metrics import read_metrics

    return read_metrics(path)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """predicate()'s first truthy value, polled every 20 ms; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout}s")
