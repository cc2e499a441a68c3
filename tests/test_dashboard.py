"""`swarm.status --serve` against a live 3-peer swarm, looked at by a real headless Chromium (Debian's package,
installed here when missing: apt-get, bounded in time; skipped with the reason only when that fails)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, _env, run_cli

pytestmark = pytest.mark.slow
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                 env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            if res.returncode != 0:
                pytest.skip(f"chromium is not installed and {' '.join(cmd)} failed: {res.stderr.strip()[-300:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"chromium is not installed and apt-get could not install it: {e}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed no chromium command")
    return found


def _dump(chromium: str, url: str, profile) -> str:
    """The page's DOM after its script has fetched and drawn the swarm."""
    res = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={profile}", "--virtual-time-budget=4000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90)
    return res.stdout


def _shown(dom: str) -> tuple[set[str], int | None]:
    peers = set(re.findall(r'<tr data-peer="([^"]+)"', dom))
    rnd = re.search(r'class="run-round">(\d+)<', dom)
    return peers, int(rnd.group(1)) if rnd else None


def test_dashboard_shows_every_peer_and_follows_the_rounds(peers, chromium, tmp_path):
    for name in ("a", "b", "c"):
        peers.start(name, "--config", TINY, "--min-peers", "3", "--max-rounds", "400",
                    initial_peers=None if name == "a" else peers.addrs("a"))
    addrs = peers.addrs("a")
    server = subprocess.Popen([sys.executable, "-m", "swarm.status", "--initial-peers", *addrs, "--serve", "--port", "0",
                               "--refresh", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(), cwd=ROOT, start_new_session=True)
    try:
        line = server.stdout.readline()  # the status process prints its URL once it listens (or fails and exits)
        url = re.search(r"http://\S+", line)
        assert url, line + (server.stdout.read() if server.poll() is not None else "")
        url = url.group(0)

        ids, first, end = set(), None, time.monotonic() + 180
        while time.monotonic() < end:
            ids, first = _shown(_dump(chromium, url, tmp_path / "profile"))
            if len(ids) == 3 and first:
                break
            time.sleep(1)
        assert len(ids) == 3 and first, f"the page showed peers {ids}, round {first}\n{peers.log('a')[-2000:]}"
        for name in "abc":  # every running peer, by its id
            own = re.search(r"peer (\w{8})", peers.log(name)).group(1)
            assert any(i.startswith(own) for i in ids), (own, ids)

        api = url + "api/swarm"
        end = time.monotonic() + 120
        while time.monotonic() < end and json.loads(urllib.request.urlopen(api, timeout=10).read())["runs"][0]["round"] <= first:
            time.sleep(0.5)
        _, later = _shown(_dump(chromium, url, tmp_path / "profile"))
        assert later is not None and later > first, (first, later)   # the page follows the swarm

        served = json.loads(urllib.request.urlopen(api, timeout=10).read())   # /api/swarm is what --json prints
        printed = json.loads(run_cli("swarm.status", "--initial-peers", *addrs, "--json", timeout=120).stdout)
        assert [r["name"] for r in served["runs"]] == [r["name"] for r in printed["runs"]] == ["tiny"]
        assert {p["peer_id"] for p in served["runs"][0]["peers"]} == {p["peer_id"] for p in printed["runs"][0]["peers"]} == ids
        assert set(served["runs"][0]) == set(printed["runs"][0])
        assert set(served["runs"][0]["peers"][0]) == set(printed["runs"][0]["peers"][0])

        server.send_signal(signal.SIGTERM)   # stops cleanly
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        try:
            os.killpg(server.pid, signal.SIGKILL)  # stray daemons
        except ProcessLookupError:
            pass
