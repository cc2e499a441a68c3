"""The TCP transport's matchmaking and exact butterfly all-reduce (swarm/transport/tcp/group.py, allreduce.py).

Real `TcpTransport`s on 127.0.0.1 (in this process, and peers in child processes); every wait is
bounded and every node and process is shut down at teardown.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import wait_for
from swarm.averaging import attribute, clip_by_norm, decode, encode, new_salt
from swarm.transport.base import ABANDONED, TransportError
from swarm.transport.tcp import allreduce as allreduce_module
from swarm.transport.tcp.group import Averager, open_gather, sign_gather
from swarm.transport.tcp.identity import Identity
from swarm.transport.tcp.node import ADDR_KEY
from swarm.transport.tcp.transport import TcpTransport

ROOT = Path(__file__).resolve().parent.parent
LOCAL = "127.0.0.1"
CLIP = 1.0
VALUES = 3000


@pytest.fixture
def swarm():
    """swarm(n, **kw) -> n connected TcpTransports that know each other's addresses; all shut down at teardown."""
    started: list[TcpTransport] = []

    def start(n: int, **kw) -> list[TcpTransport]:
        first = TcpTransport(host=LOCAL, **kw)
        started.append(first)
        out = [first]
        for _ in range(n - 1):
            t = TcpTransport(host=LOCAL, initial_peers=first.visible_maddrs(), **kw)
            started.append(t)
            out.append(t)
        everyone = {t.peer_id for t in started}
        for t in out:
            wait_for(lambda: {r.owner for r in t.node.store.get(ADDR_KEY)} >= everyone, 10.0, "addresses spread")
        return out

    yield start
    for t in started:
        t.shutdown()


def contribution(rng, values=VALUES, tokens=None, plan="plan-1", **extra):
    grad = rng.normal(size=values) * 0.01
    tokens = int(rng.integers(10, 100)) if tokens is None else tokens
    salt = new_salt(rng)
    _, norm = clip_by_norm(grad, CLIP)
    vec = encode(grad, tokens, CLIP, salt)
    gather = {"tokens": tokens, "salt": salt, "norm": float(min(norm, CLIP)), "plan": plan, **extra}
    return vec, gather


def reduce_all(transports, vectors, gathers, *, key="run.r1", size=None, timeout=10.0, wait_until=None,
               allowed=None, abandon=None):
    """Every transport's all_reduce at once (threads); a list of ReduceResult or the exception each raised."""
    size = size or len(transports)

    def one(i):
        try:
            return transports[i].all_reduce(vectors[i], group_key=key, group_size=size, gather=gathers[i],
                                            timeout=timeout, wait_until=wait_until, allowed=allowed, abandon=abandon)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            return e

    with ThreadPoolExecutor(len(transports)) as pool:
        return list(pool.map(one, range(len(transports))))


def open_all(transports, values=VALUES, chunk_timeout=3.0, max_norm_ratio=None):
    from swarm.averaging import vector_size

    for t in transports:
        t.open_averaging(run="run", vector_size=vector_size(values), matchmaking_time=1.0, allreduce_timeout=10.0,
                         clip_norm=CLIP, max_norm_ratio=max_norm_ratio, chunk_timeout=chunk_timeout)


def assert_exact(results, transports, vectors, gathers):
    assert all(not isinstance(r, Exception) for r in results), results
    first = results[0].vector
    for r in results:
        assert r.vector.dtype == np.float64 and r.vector.tobytes() == first.tobytes()  # bit-identical
    n = len(results)
    exact = decode(first, n, CLIP, values=VALUES, salt_sum=sum(g["salt"] for g in gathers))
    assert exact.tokens == sum(g["tokens"] for g in gathers)
    expected = np.sum(vectors, axis=0)
    np.testing.assert_array_equal(np.rint(first * n), expected)  # the exact integer sum
    ids = [t.peer_id for t in transports]
    for r in results:
        assert set(r.gathered) == set(ids) and r.rejections == {}
        assert {p: g["salt"] for p, g in r.gathered.items()} == {t.peer_id: g["salt"] for t, g in zip(transports, gathers)}
        assert r.leader == min(ids) and r.spans == results[0].spans
        assert sorted(r.spans.values())[0][0] == 0 and sorted(r.spans.values())[-1][1] == len(first)
        assert r.bytes_sent > 0 and r.bytes_received > 0


@pytest.mark.parametrize("n", [2, 3, 4])
def test_members_get_bit_identical_exact_averages(swarm, n):
    ts = swarm(n)
    open_all(ts)
    rng = np.random.default_rng(n)
    vectors, gathers = zip(*(contribution(rng) for _ in ts))
    results = reduce_all(ts, vectors, gathers, wait_until=ts[0].now() + 5)
    assert_exact(results, ts, vectors, gathers)
    assert all(not t.reducing() for t in ts)
    # spans: equal sizes, leader first
    sizes = sorted(b - a for a, b in results[0].spans.values())
    assert sizes[-1] - sizes[0] <= 1


def test_private_swarm_averages(swarm):
    from swarm.key import SwarmKey

    ts = swarm(2, swarm_key=SwarmKey(b"s" * 32))
    open_all(ts)
    rng = np.random.default_rng(13)
    vectors, gathers = zip(*(contribution(rng) for _ in ts))
    assert_exact(reduce_all(ts, vectors, gathers, wait_until=ts[0].now() + 5), ts, vectors, gathers)


def test_big_vector_in_many_chunks(swarm, monkeypatch):
    monkeypatch.setattr(allreduce_module, "CHUNK_VALUES", 1000)  # every member is in this process: all agree
    ts = swarm(3)
    values = 20_000
    open_all(ts, values=values)
    rng = np.random.default_rng(7)
    vectors, gathers = zip(*(contribution(rng, values=values) for _ in ts))
    results = reduce_all(ts, vectors, gathers, wait_until=ts[0].now() + 5)
    assert all(not isinstance(r, Exception) for r in results), results
    assert len({r.vector.tobytes() for r in results}) == 1
    np.testing.assert_array_equal(np.rint(results[0].vector * 3), np.sum(vectors, axis=0))
    decode(results[0].vector, 3, CLIP, values=values, salt_sum=sum(g["salt"] for g in gathers))


def test_a_stalled_reducer_fails_everyone(swarm, monkeypatch):
    ts = swarm(3)
    open_all(ts, chunk_timeout=1.0)
    staller = ts[2].peer_id
    real = allreduce_module.Exchange._write

    async def write(self, j):
        if self.me == staller:  # sends its parts, never the averaged span it owes
            self._post = lambda msg: None
        await real(self, j)
        if self.me == staller:
            await asyncio.sleep(60)

    monkeypatch.setattr(allreduce_module.Exchange, "_write", write)
    rng = np.random.default_rng(12)
    vectors, gathers = zip(*(contribution(rng) for _ in ts))
    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        watching = pool.submit(wait_for, lambda: all(t.reducing() for t in ts), 10.0, "reducing")
        results = reduce_all(ts, vectors, gathers, wait_until=ts[0].now() + 5, timeout=8.0)
        watching.result()
    assert time.monotonic() - start < 5
    for r in results:
        assert isinstance(r, TransportError), r
    for t, r in zip(ts, results):
        if t.peer_id != staller:
            assert "nothing moved for 1s" in str(r) or "connection closed" in str(r), r
    assert all(not t.reducing() for t in ts)


def test_group_forms_at_wait_until_with_fewer_members(swarm):
    ts = swarm(2)
    open_all(ts)
    rng = np.random.default_rng(1)
    vectors, gathers = zip(*(contribution(rng) for _ in ts))
    start = time.monotonic()
    results = reduce_all(ts, vectors, gathers, size=3, wait_until=ts[0].now() + 1.5)
    took = time.monotonic() - start
    assert_exact(results, ts, vectors, gathers)
    assert 1.3 < took < 6


def test_no_group_is_a_transport_error(swarm):
    (t,) = swarm(1)
    open_all([t])
    vec, gather = contribution(np.random.default_rng(2))
    start = time.monotonic()
    with pytest.raises(TransportError, match="no group formed before the deadline"):
        t.all_reduce(vec, group_key="lonely", group_size=2, gather=gather, timeout=1.0, wait_until=t.now() + 0.5)
    assert time.monotonic() - start < 4


def test_abandon_ends_the_search(swarm):
    ts = swarm(2)
    open_all(ts)
    vec, gather = contribution(np.random.default_rng(3))
    asked = []

    def abandon():
        asked.append(time.monotonic())
        return "the plan changed" if len(asked) >= 2 else None

    start = time.monotonic()
    with pytest.raises(TransportError) as e:  # its partner never shows up (another group key)
        ts[0].all_reduce(vec, group_key="k", group_size=2, gather=gather, timeout=30.0, wait_until=ts[0].now() + 20,
                         abandon=abandon)
    assert str(e.value) == ABANDONED + "the plan changed"
    assert 1.5 < time.monotonic() - start < 5
    # and the peer can average right after
    rng = np.random.default_rng(4)
    vectors, gathers = zip(*(contribution(rng) for _ in ts))
    assert_exact(reduce_all(ts, vectors, gathers, key="k", wait_until=ts[0].now() + 5), ts, vectors, gathers)


def test_shutdown_ends_an_all_reduce(swarm):
    (t,) = swarm(1)
    vec, gather = contribution(np.random.default_rng(14))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(t.all_reduce, vec, group_key="k", group_size=2, gather=gather, timeout=60.0,
                              wait_until=t.now() + 60)
        time.sleep(0.5)
        start = time.monotonic()
        t.shutdown()
        with pytest.raises(TransportError):
            pending.result(timeout=10)
    assert time.monotonic() - start < 5


def test_followers_regroup_when_their_leader_abandons(swarm):
    ts = swarm(3)
    open_all(ts)
    leader = min(ts, key=lambda t: t.peer_id)
    rng = np.random.default_rng(16)
    vectors, gathers = zip(*(contribution(rng) for _ in ts))
    quit_at = time.monotonic() + 1.0

    def run(i):
        t = ts[i]
        abandon = (lambda: "leaving" if time.monotonic() > quit_at else None) if t is leader else None
        try:
            return t.all_reduce(vectors[i], group_key="regroup", group_size=4, gather=gathers[i], timeout=6.0,
                                wait_until=t.now() + 3.0, abandon=abandon)
        except TransportError as e:
            return e

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, range(3)))
    by = {t.peer_id: r for t, r in zip(ts, results)}
    assert str(by[leader.peer_id]) == ABANDONED + "leaving"
    rest = [t for t in ts if t is not leader]
    assert_exact([by[t.peer_id] for t in rest], rest, [vectors[ts.index(t)] for t in rest],
                 [gathers[ts.index(t)] for t in rest])


def test_outsiders_and_other_plans_are_refused(swarm):
    ts = swarm(4)
    open_all(ts)
    rng = np.random.default_rng(5)
    ids = sorted(ts, key=lambda t: t.peer_id)
    # the smallest id names another plan, the second is not in the plan: the other two average alone
    plans = {ids[0].peer_id: "plan-X"}
    allowed = {ids[0].peer_id, ids[2].peer_id, ids[3].peer_id}
    vectors, gathers = zip(*(contribution(rng, plan=plans.get(t.peer_id, "plan-1")) for t in ts))
    results = reduce_all(ts, vectors, gathers, size=4, allowed=allowed, wait_until=ts[0].now() + 2.0, timeout=3.0)
    by_id = {t.peer_id: r for t, r in zip(ts, results)}
    good = [ids[2], ids[3]]
    assert_exact([by_id[t.peer_id] for t in good], good, [vectors[ts.index(t)] for t in good],
                 [gathers[ts.index(t)] for t in good])
    for t in (ids[0], ids[1]):
        assert isinstance(by_id[t.peer_id], TransportError), by_id[t.peer_id]


def test_banned_peer_is_refused(swarm):
    ts = swarm(3)
    open_all(ts)
    rng = np.random.default_rng(6)
    ids = sorted(ts, key=lambda t: t.peer_id)
    bad = ids[0]  # the would-be leader
    for t in ts:
        if t is not bad:
            t.ban({bad.peer_id})
    vectors, gathers = zip(*(contribution(rng) for _ in ts))
    results = reduce_all(ts, vectors, gathers, size=3, wait_until=ts[0].now() + 1.5, timeout=2.5)
    by_id = {t.peer_id: r for t, r in zip(ts, results)}
    assert isinstance(by_id[bad.peer_id], TransportError)
    good = [t for t in ts if t is not bad]
    assert_exact([by_id[t.peer_id] for t in good], good, [vectors[ts.index(t)] for t in good],
                 [gathers[ts.index(t)] for t in good])


@pytest.mark.parametrize("fault", ["tokens", "nan"])
def test_bad_part_is_rejected_and_named_by_every_member(swarm, fault):
    ts = swarm(3)
    open_all(ts)
    rng = np.random.default_rng(8)
    vectors, gathers = map(list, zip(*(contribution(rng) for _ in ts)))
    cheat = 1
    if fault == "tokens":
        gathers[cheat] = {**gathers[cheat], "tokens": gathers[cheat]["tokens"] + 1}
    else:
        vectors[cheat] = vectors[cheat].copy()
        vectors[cheat][VALUES // 2] = np.nan
    results = reduce_all(ts, vectors, gathers, wait_until=ts[0].now() + 5)
    assert all(not isinstance(r, Exception) for r in results), results
    assert len({r.vector.tobytes() for r in results}) == 1
    name = ts[cheat].peer_id
    reasons = [r.rejections for r in results]
    assert all(list(rej) == [name] for rej in reasons) and len({rej[name] for rej in reasons}) == 1, reasons
    assert ("tokens" in reasons[0][name]) if fault == "tokens" else ("NaN" in reasons[0][name])
    members = sorted(results[0].gathered)
    salts = [results[0].gathered[m]["salt"] for m in members]
    for t, r in zip(ts, results):
        verdict = attribute(r.vector, salts, members.index(t.peer_id))
        assert [members[i] for i in verdict.rejected] == [name]


@pytest.mark.parametrize("fault", ["short", "oversized"])
def test_misshapen_parts(swarm, monkeypatch, fault):
    """A part of the wrong length is rejected (marker); one over the frame cap disconnects its sender: all fail."""
    ts = swarm(3)
    open_all(ts)
    cheater = ts[1].peer_id
    real_init, real_send = allreduce_module.Exchange.__init__, allreduce_module.Meter.send

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        self.meter.cheat = self.me == cheater

    async def send(self, ch, msg):
        if getattr(self, "cheat", False) and msg["t"] == "part":
            ch.max_frame = 1 << 24  # a hostile sender ignores the cap: its receivers must not
            msg = {**msg, "d": msg["d"][:-8] if fault == "short" else msg["d"] + bytes(allreduce_module.frame_cap())}
        await real_send(self, ch, msg)

    monkeypatch.setattr(allreduce_module.Exchange, "__init__", init)
    monkeypatch.setattr(allreduce_module.Meter, "send", send)
    rng = np.random.default_rng(15)
    vectors, gathers = zip(*(contribution(rng) for _ in ts))
    results = reduce_all(ts, vectors, gathers, wait_until=ts[0].now() + 5, timeout=5.0)
    if fault == "oversized":
        assert all(isinstance(r, TransportError) for r in results), results
        assert any("(limit" in str(r) for r in results), results  # "a frame announced N bytes (limit M)"
        return
    assert all(not isinstance(r, Exception) for r in results), results
    assert len({r.vector.tobytes() for r in results}) == 1
    assert all(list(r.rejections) == [cheater] and "bytes, expected float64" in r.rejections[cheater] for r in results)
    members = sorted(results[0].gathered)
    verdict = attribute(results[0].vector, [results[0].gathered[m]["salt"] for m in members], 0)
    assert [members[i] for i in verdict.rejected] == [cheater]


def test_forged_gather_fails_the_attempt(swarm, monkeypatch):
    ts = swarm(3)
    open_all(ts)
    leader = min(ts, key=lambda t: t.peer_id)
    real = Averager.group_message

    def lying(self, a, group):  # the leader relabels two followers' gathers
        msg = real(self, a, group)
        if self is leader._averager:
            msg = {**msg, "gathers": [msg["gathers"][0], msg["gathers"][2], msg["gathers"][1]]}
        return msg

    monkeypatch.setattr(Averager, "group_message", lying)
    rng = np.random.default_rng(9)
    vectors, gathers = zip(*(contribution(rng) for _ in ts))
    results = reduce_all(ts, vectors, gathers, wait_until=ts[0].now() + 5, timeout=4.0)
    for t, r in zip(ts, results):
        assert isinstance(r, TransportError), r
        if t is not leader:
            assert "is not signed by them" in str(r)


def test_signed_gathers():
    me, other = Identity.generate(), Identity.generate()
    w = sign_gather(me, None, "g", 10, {"plan": "p", "x": (1, 2)})
    assert open_gather(w, me.peer_id, "g", None) == ({"plan": "p", "x": [1, 2]}, 10)
    assert open_gather(w, other.peer_id, "g", None) is None       # relabelled
    assert open_gather(w, me.peer_id, "h", None) is None          # another group
    assert open_gather({**w, "n": 11}, me.peer_id, "g", None) is None
    from swarm.key import SwarmKey

    key = SwarmKey(b"k" * 32)
    wk = sign_gather(me, key, "g", 10, {})
    assert open_gather(wk, me.peer_id, "g", key) is not None
    assert open_gather(w, me.peer_id, "g", key) is None           # no membership proof
    assert open_gather(wk, me.peer_id, "g", SwarmKey(b"j" * 32)) is None


CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from swarm.transport.tcp.transport import TcpTransport
    from swarm.transport.tcp import channel
    from swarm.averaging import encode, vector_size
    mode, peers, key = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    t = TcpTransport(host="127.0.0.1", initial_peers=peers)
    print(t.visible_maddrs()[0], flush=True)
    values = int(sys.argv[4])
    t.open_averaging(run="run", vector_size=vector_size(values), matchmaking_time=1.0, allreduce_timeout=10.0,
                     clip_norm=1.0, chunk_timeout=2.0)
    if mode == "die":  # killed mid-exchange: right after its first part went out
        real = channel.Channel.send
        async def send(self, msg):
            await real(self, msg)
            if msg.get("t") == "part":
                os._exit(9)
        channel.Channel.send = send
    vec = encode(np.zeros(values), 10, 1.0, 12345)
    gather = {"tokens": 10, "salt": 12345, "norm": 0.0, "plan": "plan-1"}
    try:
        r = t.all_reduce(vec, group_key=key, group_size=int(sys.argv[5]), gather=gather, timeout=8.0,
                         wait_until=t.now() + 8)
        print("ok", r.vector.tobytes().hex()[:64], r.leader, flush=True)
    except Exception as e:
        print("error", e, flush=True)
    t.shutdown()
""")


def _child(mode: str, peers: list[str], key: str, values: int, size: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, ",".join(peers), key, str(values), str(size)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _finish(child: subprocess.Popen, timeout: float = 30.0) -> str:
    try:
        out, err = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return out + err[-3000:]


def test_with_a_peer_in_another_process(swarm):
    ts = swarm(2)
    open_all(ts)
    child = _child("ok", ts[0].visible_maddrs(), "proc", VALUES, 3)
    try:
        child_id = child.stdout.readline().strip().rsplit("/", 1)[-1]
        wait_for(lambda: all(child_id in {r.owner for r in t.node.store.get(ADDR_KEY)} for t in ts), 10, "child's address")
        rng = np.random.default_rng(10)
        vectors, gathers = zip(*(contribution(rng) for _ in ts))
        results = reduce_all(ts, vectors, gathers, key="proc", size=3, wait_until=ts[0].now() + 8, timeout=8.0)
        out = _finish(child)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert all(not isinstance(r, Exception) for r in results), (results, out)
    assert results[0].vector.tobytes() == results[1].vector.tobytes() and len(results[0].gathered) == 3
    assert out.split()[:2] == ["ok", results[0].vector.tobytes().hex()[:64]], out


def test_member_killed_mid_exchange_fails_everyone(swarm):
    ts = swarm(2)
    values = 400_000  # ~3.2 MB: several chunks per span
    open_all(ts, values=values, chunk_timeout=2.0)
    child = _child("die", ts[0].visible_maddrs(), "kill", values, 3)
    try:
        child_id = child.stdout.readline().strip().rsplit("/", 1)[-1]
        wait_for(lambda: all(child_id in {r.owner for r in t.node.store.get(ADDR_KEY)} for t in ts), 10, "child's address")
        rng = np.random.default_rng(11)
        vectors, gathers = zip(*(contribution(rng, values=values) for _ in ts))
        start = time.monotonic()
        results = reduce_all(ts, vectors, gathers, key="kill", size=3, wait_until=ts[0].now() + 8, timeout=8.0)
        took = time.monotonic() - start
        _finish(child)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 9
    for r in results:
        assert isinstance(r, TransportError), r
        assert "all-reduce failed" in str(r)
    assert took < 20  # well before the attempt's backstop (about 32 s here): nobody waited for a dead member
    assert all(not t.reducing() for t in ts)


def test_the_training_loops_round_averages_over_tcp(swarm):
    """swarm.round.average_round end to end: signed gathers, exact decode, and the result check over records."""
    from swarm.backends.base import TrainResult
    from swarm.round import average_round

    ts = swarm(3)
    values = 768
    open_all(ts, values=values)
    quotas = {t.peer_id: 1000 for t in ts}

    def one(i):
        train = TrainResult(grads={"w": np.full(values, 0.01 * (i + 1), dtype=np.float32)}, tokens=100 * (i + 1),
                            loss_sum=1.0, seconds=0.1)
        return average_round(ts[i], train, names=["w"], shapes={"w": (values,)}, round_=1, plan_id="plan-1",
                             group_size=3, clip_norm=1.0, timeout=10.0, run="tcp", wait_until=ts[i].now() + 5,
                             lineage="0" * 64, quotas=quotas)

    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(one, range(3)))
    assert all(o.ok for o in outs), [o.reason for o in outs]
    assert len({o.update_sha256 for o in outs}) == 1 and all(o.group_size == 3 for o in outs)
    expected = (0.01 * 100 + 0.02 * 200 + 0.03 * 300) / 600  # token-weighted mean
    np.testing.assert_allclose(outs[0].mean_grads["w"], expected, rtol=1e-5)
    assert all(o.bytes_sent > 0 for o in outs)


NO_HIVEMIND = textwrap.dedent("""
    import sys, threading
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hivemind", "uvloop", "torch"):
                raise ImportError(name + " is blocked in this test")
    sys.meta_path.insert(0, Refuse())
    import numpy as np
    from swarm.averaging import encode, vector_size
    from swarm.transport.tcp.transport import TcpTransport
    a = TcpTransport(host="127.0.0.1")
    b = TcpTransport(host="127.0.0.1", initial_peers=a.visible_maddrs())
    import time
    deadline = time.monotonic() + 10
    while len(a.node.store.get("_swarm.tcp.addrs")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    out = {}
    def one(t, salt):
        vec = encode(np.full(300, 0.01), 5, 1.0, salt)
        out[t.peer_id] = t.all_reduce(vec, group_key="k", group_size=2, timeout=10.0, wait_until=t.now() + 5,
                                      gather={"tokens": 5, "salt": salt, "norm": 0.17320508075688773})
    ths = [threading.Thread(target=one, args=(t, s)) for t, s in ((a, 11), (b, 22))]
    [th.start() for th in ths]
    [th.join(30) for th in ths]
    a.shutdown(); b.shutdown()
    assert len({r.vector.tobytes() for r in out.values()}) == 1 and len(out) == 2
    assert not any(m.split(".")[0] in ("hivemind", "uvloop", "torch") for m in sys.modules)
    print("ok", type(a.node._runner.loop).__module__.split(".")[0])
""")


def test_all_reduce_works_where_hivemind_torch_and_uvloop_cannot_be_imported():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", NO_HIVEMIND], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=env)
    assert out.returncode == 0 and out.stdout.split() == ["ok", "asyncio"], out.stderr[-3000:]


def int8_contribution(rng, values=VALUES, **extra):
    from swarm.codec import Int8Contribution

    grad = rng.normal(size=values) * 0.01
    tokens = int(rng.integers(10, 100))
    c = Int8Contribution.make(grad, tokens, CLIP, new_salt(rng))
    _, norm = clip_by_norm(grad, CLIP)
    return c, {"tokens": tokens, "salt": c.salt, "norm": float(min(norm, CLIP)), "plan": "plan-1", **c.announce(), **extra}


@pytest.mark.parametrize("fault", ["oversized", "nan"])
def test_int8_codec_sums_exactly_and_names_a_hostile_sender(swarm, fault):
    """averaging.codec int8 over tcp: int8 parts and int16 sums, bit-identical results, the exact integer sum of
    what the honest members sent, a hostile member named by every member; about a fifth of exact's bytes."""
    from swarm.averaging import vector_size
    from swarm.codec import CHECK_EVERY, decode_int8

    ts = swarm(3)
    for t in ts:
        t.open_averaging(run="run", vector_size=vector_size(VALUES), matchmaking_time=1.0, allreduce_timeout=10.0,
                         clip_norm=CLIP, chunk_timeout=3.0, codec="int8")
    rng = np.random.default_rng(21)
    contribs, gathers = map(list, zip(*(int8_contribution(rng) for _ in ts)))
    cheat = 2
    if fault == "nan":
        gathers[cheat] = {**gathers[cheat], "norm": float("nan")}
    else:
        real = contribs[cheat].encode

        def oversized(shared):
            v = real(shared).copy()
            v[:CHECK_EVERY] = 127.0  # the int8 limit: far beyond its announced norm
            return v

        contribs[cheat].encode = oversized
    results = reduce_all(ts, contribs, gathers, wait_until=ts[0].now() + 5)
    assert all(not isinstance(r, Exception) for r in results), results
    assert len({r.vector.tobytes() for r in results}) == 1
    name = ts[cheat].peer_id
    assert all(list(r.rejections) == [name] for r in results), [r.rejections for r in results]
    assert ("nan" in results[0].rejections[name]) if fault == "nan" else ("bound" in results[0].rejections[name])
    members = list(results[0].gathered)
    salts = [results[0].gathered[m]["salt"] for m in members]
    for t, r in zip(ts, results):
        assert [members[i] for i in attribute(r.vector, salts, members.index(t.peer_id)).rejected] == [name]
    # the exact integer sum of what was sent: without the hostile member's part from where a reducer rejected it
    assert all(contribs[i].shared.tobytes() == contribs[0].shared.tobytes() for i in range(3))
    expected = sum(contribs[i].vector for i in range(3) if i != cheat)
    if fault == "oversized":  # only the reducer of the first span saw a bad part: the others summed its honest ones
        a, b = sorted(results[0].spans.values())[1][0], len(expected)
        expected[a:b] += contribs[cheat].vector[a:b]
    got = np.rint(results[0].vector * 3)
    lanes = np.zeros(len(got), dtype=bool)
    lanes[CHECK_EVERY::CHECK_EVERY + 1] = True
    np.testing.assert_array_equal(got[~lanes], expected[~lanes])
    with pytest.raises(Exception):  # the rejection shows in the lanes: not decodable as a clean sum
        decode_int8(results[0].vector, 3, contribs[0].shared, CLIP, VALUES, sum(salts))
    # traffic: int8 out, int16 back, int64 lanes; the exact codec's float64 would be 8 bytes a value each way
    size = vector_size(VALUES)
    exact_bytes = 8 * size * 2 * 2 * (3 - 1) / 3  # parts out and averages back, sent + received, to 2 of 3 reducers
    total = sum(r.bytes_sent + r.bytes_received for r in results) / 3
    assert 0.15 < total / exact_bytes < 0.25, total / exact_bytes
