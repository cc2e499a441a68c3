"""State download over the TCP transport (swarm/transport/tcp/state.py): real nodes on 127.0.0.1.

Servers cut state in 64 KiB chunks here (1 MiB in use) so that a few MB make a download of many chunks.
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest

from conftest import wait_for
from swarm.key import SwarmKey
from swarm.transport.base import Record
from swarm.transport.tcp import state as st
from swarm.transport.tcp.channel import ChannelError
from swarm.transport.tcp.transport import TcpTransport

LOCAL = "127.0.0.1"
CHUNK = 64 << 10


def make_state(round_: int, floats: int = 100_000, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(floats, dtype=np.float32), rng.standard_normal((10, 7)).astype(np.float32)]
    return {"round": round_, "names": ["a", "b"], "speeds": {"x": 1.5}}, arrays


@pytest.fixture
def nodes():
    """start(state=(meta, arrays), round_=r) -> a TcpTransport on 127.0.0.1 (serving that state); all shut down after."""
    started: list[TcpTransport] = []

    def start(state=None, round_=None, **kw) -> TcpTransport:
        if started and "initial_peers" not in kw:
            kw["initial_peers"] = started[0].visible_maddrs()
        t = TcpTransport(host=LOCAL, **kw)
        started.append(t)
        t.open_averaging(run="r", vector_size=1 << 20, matchmaking_time=2.0, allreduce_timeout=20.0)
        t._state.chunk = CHUNK
        if state is not None:
            t.serve_state(lambda: state)
            t.announce_state_round(state[0]["round"] if round_ is None else round_)
        return t

    yield start
    for t in started:
        t.shutdown()


def sees(t: TcpTransport, *servers: TcpTransport):
    want = {s.peer_id for s in servers}
    wait_for(lambda: want <= {r.owner for r in t.get(st.state_key("r"))}, 10.0, "state announcements")


def same(got, state, source):
    assert got is not None
    meta, arrays, src = got
    assert src == source
    assert meta == state[0]
    assert len(arrays) == len(state[1])
    for a, b in zip(arrays, state[1]):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_download_from_one_server_and_filters(nodes):
    state = make_state(3)
    a = nodes(state)
    b = nodes()
    sees(b, a)
    same(b.download_state(timeout=10), state, a.peer_id)
    assert a._state.served == [(b.peer_id, 0)]
    assert b.download_state(timeout=2, min_round=4) is None            # only newer state wanted
    assert b.download_state(timeout=2, skip={a.peer_id}) is None       # the caller skips it
    b.distrust(a.peer_id)
    assert b.download_state(timeout=2) is None                         # never again
    assert a.download_state(timeout=2) is None                         # not from itself


def test_newest_round_first(nodes):
    old, new = make_state(2, seed=1), make_state(5, seed=2)
    a, c = nodes(old), nodes(new)
    b = nodes()
    sees(b, a, c)
    same(b.download_state(timeout=10), new, c.peer_id)
    same(b.download_state(timeout=10, min_round=3), new, c.peer_id)
    same(b.download_state(timeout=10, skip={c.peer_id}), old, a.peer_id)
    c.announce_state_round(1)  # c's state is now older than a's (announced again: served anew)
    wait_for(lambda: any(r.value == {"round": 1} for r in b.get(st.state_key("r"))), 5.0, "the new announcement")
    same(b.download_state(timeout=10), old, a.peer_id)


def test_dead_server_download_resumes_at_the_same_offset_elsewhere(nodes):
    """Two servers of the same state: the first dies mid-download; the second goes on from the chunk reached."""
    state = make_state(7, floats=600_000)          # ~2.4 MB: 37 chunks
    servers = [nodes(state), nodes(state)]
    for s in servers:
        s._state.pace = 0.03
    b = nodes()
    sees(b, *servers)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(b.download_state(timeout=30)))
    worker.start()
    first = wait_for(lambda: next((s for s in servers if s._state.served), None), 10.0, "a download starting")
    wait_for(lambda: b._state.received >= 5 * CHUNK, 10.0, "a few chunks in")
    first.shutdown()
    worker.join(35)
    other = servers[1] if first is servers[0] else servers[0]
    same(got[0], state, other.peer_id)
    assert other._state.served and other._state.served[0][1] > 0, other._state.served  # resumed, not restarted


def test_different_state_elsewhere_starts_over(nodes):
    newer, older = make_state(8, floats=400_000, seed=3), make_state(6, floats=400_000, seed=4)
    a, c = nodes(newer), nodes(older)
    a._state.pace = 0.03
    b = nodes()
    sees(b, a, c)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(b.download_state(timeout=30)))
    worker.start()
    wait_for(lambda: b._state.received >= 5 * CHUNK, 10.0, "a few chunks in")
    a.shutdown()
    worker.join(35)
    same(got[0], older, c.peer_id)
    assert c._state.served == [(b.peer_id, 0)]


def test_lying_servers_are_refused_and_the_next_one_used(nodes):
    honest = make_state(4, seed=5)
    good = nodes(honest)
    # a server whose bytes are not the ones it declares (round 9: asked first)
    wrong = nodes(make_state(9, seed=6))
    snap = st.build_snapshot(*make_state(9, seed=6), chunk=CHUNK)
    tampered = st.Snapshot(snap.meta, snap.specs, b"\0" * 100 + snap.blob[100:], snap.chunk, snap.digests, snap.hash)

    async def lie():
        return tampered

    wrong._state._snap = lie
    # a server declaring far more than this run's state can weigh (round 10: asked first of all)
    big = nodes(({"round": 10}, [np.zeros(3 << 20, dtype=np.float32)]))
    b = nodes()
    b.open_averaging(run="r", vector_size=1000, matchmaking_time=2.0, allreduce_timeout=20.0)  # state of this run weighs at most 16 kB + metadata
    sees(b, good, wrong, big)
    same(b.download_state(timeout=15), honest, good.peer_id)
    assert {wrong.peer_id, big.peer_id} <= b._state.distrusted
    assert good.peer_id not in b._state.distrusted


def test_timeout_returns_none_and_the_server_cleans_up(nodes):
    a = nodes(make_state(3, floats=400_000))
    a._state.pace = 0.5
    b = nodes()
    sees(b, a)
    start = time.monotonic()
    assert b.download_state(timeout=1.5) is None
    assert time.monotonic() - start < 4.0
    wait_for(lambda: a._state._serving == 0, 10.0, "the server ending the abandoned download")
    assert b.download_state(timeout=1.0) is None  # a source too slow is not asked again for a while
    assert a._state.served == [(b.peer_id, 0)]


def test_a_server_with_no_state_yet_says_so(nodes):
    a = nodes()
    a.serve_state(lambda: (None, []))
    a.announce_state_round(2)
    b = nodes()
    sees(b, a)
    assert b.download_state(timeout=3) is None


def test_strangers_of_a_private_swarm_cannot_ask_for_state(nodes):
    key = SwarmKey(b"k" * 32)
    a = nodes(make_state(3), swarm_key=key)
    stranger = TcpTransport(host=LOCAL)  # an open node that learned a's address somehow
    try:
        stranger.node.store.add(a.node.store.latest("_swarm.tcp.addrs", a.peer_id))
        with pytest.raises(ChannelError, match="refused|not in this private swarm"):
            stranger.node.call(stranger.node.open_service(a.peer_id, st.SERVICE))
    finally:
        stranger.shutdown()
    assert a._state.served == []


def test_a_banned_peer_is_no_state_source_either(nodes):
    a = nodes()
    a.ban({"x"})
    assert a._state.banned == {"x"}


# --- pure parts ---------------------------------------------------------------------------------
def test_order_sources_newest_first_ties_fixed_per_downloader():
    recs = [Record("p1", {"round": 5}, 0.0), Record("p2", {"round": 7}, 0.0), Record("p3", {"round": 5}, 0.0),
            Record("p4", {"round": 2}, 0.0), Record("p5", {"round": "9"}, 0.0), Record("p6", [9], 0.0),
            Record("me", {"round": 9}, 0.0), Record("p7", {"round": True}, 0.0)]
    order = st.order_sources(recs, "me", 3, set())
    assert order[0] == "p2" and set(order[1:]) == {"p1", "p3"}
    tie = sorted(["p1", "p3"], key=lambda p: hashlib.sha256(f"me|{p}".encode()).digest())
    assert order[1:] == tie
    assert st.order_sources(recs, "me", 3, {"p2"}) == tie
    assert st.order_sources(recs, "me", 8, set()) == []


def _head(snap: st.Snapshot, **changes) -> dict:
    msg = snap.head(0)
    msg.update(changes)
    return msg


@pytest.mark.parametrize("changes, why", [
    ({"size": 10 ** 9}, "declared a"),
    ({"size": -1}, "declared a"),
    ({"chunk": 0}, "out of bounds"),
    ({"chunk": st.MAX_CHUNK + 1}, "out of bounds"),
    ({"digests": []}, "digests do not match"),
    ({"specs": [["<f4", [3]]]}, "weigh"),
    ({"specs": [["O", [3]]]}, "malformed"),
    ({"specs": [["<f4", "x"]]}, "malformed"),
    ({"o": 5}, "chunk boundary"),
    ({"h": b"\0" * 32}, "hash does not cover"),
    ({"meta": 3}, "malformed"),
])
def test_bad_declarations_are_lies(changes, why):
    snap = st.build_snapshot(*make_state(1, floats=50_000), chunk=CHUNK)
    assert st.check_head(snap.head(0), 1 << 24).size == len(snap.blob)
    with pytest.raises(st.Lying, match=why):
        st.check_head(_head(snap, **changes), 1 << 24)


# --- a server process killed for real ----------------------------------------------------------
SERVER = """
import sys, time
import numpy as np
from swarm.transport.tcp.transport import TcpTransport
rnd, pace = int(sys.argv[1]), float(sys.argv[2])
t = TcpTransport(host="127.0.0.1")
t.open_averaging(run="r", vector_size=1 << 20, matchmaking_time=2.0, allreduce_timeout=20.0)
t._state.chunk, t._state.pace = 64 << 10, pace
rng = np.random.default_rng(0)
state = ({"names": ["a"]}, [rng.standard_normal(500_000, dtype=np.float32)])
t.serve_state(lambda: state)
t.announce_state_round(rnd)
print(" ".join(t.visible_maddrs()), flush=True)
time.sleep(120)
"""


def _same_state():
    rng = np.random.default_rng(0)
    return {"names": ["a"]}, [rng.standard_normal(500_000, dtype=np.float32)]


@pytest.fixture
def server_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    procs = []

    def start(rnd: int, pace: float, env: dict | None = None):
        p = subprocess.Popen([sys.executable, "-c", SERVER, str(rnd), str(pace)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(root), **(env or {})), cwd=root, start_new_session=True)
        procs.append(p)
        return p, p.stdout.readline().split()

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_server_process_killed_mid_download_resumes_on_one_with_the_same_state(nodes, server_process):
    proc, addrs = server_process(8, 0.03)     # round 8: asked first
    c = nodes(_same_state(), round_=7, initial_peers=addrs)  # the same state, announced as an older round
    b = nodes(initial_peers=addrs)
    wait_for(lambda: len(b.get(st.state_key("r"))) == 2, 10.0, "both announcements")
    got: list = []
    worker = threading.Thread(target=lambda: got.append(b.download_state(timeout=30)))
    worker.start()
    wait_for(lambda: b._state.received >= 5 * CHUNK, 10.0, "a few chunks in")  # of 31, 30 ms apart
    proc.kill()
    worker.join(35)
    same(got[0], _same_state(), c.peer_id)
    assert c._state.served and c._state.served[0][1] > 0, c._state.served


def test_chaos_flag_kills_the_server_as_it_serves(nodes, server_process, tmp_path):
    flag = tmp_path / "die"
    flag.write_text("")
    proc, addrs = server_process(8, 0.0, env={"SWARM_CHAOS_DIE_SERVING": str(flag)})
    c = nodes(_same_state(), round_=7, initial_peers=addrs)
    b = nodes(initial_peers=addrs)
    wait_for(lambda: len(b.get(st.state_key("r"))) == 2, 10.0, "both announcements")
    same(b.download_state(timeout=20), _same_state(), c.peer_id)
    assert proc.wait(10) == -9 and not flag.exists()  # it took the flag and died serving
    assert c._state.served == [(b.peer_id, 0)]


def _fake_server(snap: st.Snapshot, how: str):
    """A "state" service that breaks the protocol in one way (`how`) after a sound request."""
    async def serve(ch):
        await ch.recv(5.0)
        if how == "no head":
            await ch.send({"t": "chunk", "i": 0, "d": snap.piece(0)})
            return
        if how == "resumes unasked":
            await ch.send(snap.head(1))
            return
        await ch.send(snap.head(0))
        n = len(snap.digests)
        order = {"out of order": [1, 0] + list(range(2, n)), "extra chunk": list(range(n)) + [n - 1]}.get(how, range(n))
        for i in order:
            data = snap.piece(i)
            if how == "short chunk" and i == 2:
                data = data[:-1]
            await ch.send({"t": "chunk", "i": i, "d": data})
        if how == "ends early":
            return
        await ch.send({"t": "end"})
    return serve


@pytest.mark.parametrize("how", ["no head", "resumes unasked", "out of order", "extra chunk", "short chunk"])
def test_protocol_breakers_are_refused_and_the_next_server_used(nodes, how):
    honest = make_state(4, seed=7)
    good = nodes(honest)
    liar = nodes(make_state(9, seed=8))  # newer: asked first
    liar.node.register_service(st.SERVICE, _fake_server(st.build_snapshot(*make_state(9, seed=8), chunk=CHUNK), how))
    b = nodes()
    sees(b, good, liar)
    same(b.download_state(timeout=15), honest, good.peer_id)
    assert liar.peer_id in b._state.distrusted


def test_a_server_ending_early_is_only_avoided_a_while(nodes):
    honest = make_state(4, seed=7)
    good = nodes(honest)
    quitter = nodes(make_state(9, seed=8))
    quitter.node.register_service(st.SERVICE, _fake_server(st.build_snapshot(*make_state(9, seed=8), chunk=CHUNK),
                                                           "ends early"))
    b = nodes()
    sees(b, good, quitter)
    same(b.download_state(timeout=15), honest, good.peer_id)
    assert quitter.peer_id not in b._state.distrusted and quitter.peer_id in b._state.avoid  # gone, not lying
