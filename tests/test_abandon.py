"""A group does not wait for a member that said it won't come: leaving, pausing, or catching up to a later round.

Unit tests of the rules on a Peer with stubbed membership records, and the transport's abandon hook on
two real hivemind peers on 127.0.0.1 (nat_port_map off: the transport turns it off on loopback).
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from swarm.averaging import vector_size
from swarm.backends.base import TrainResult
from swarm.peer import Peer
from swarm.round import average_round
from swarm.transport.base import ABANDONED


def _peer(adverts, progress, me="me"):
    p = Peer()
    p.me = me
    p.run = SimpleNamespace(name="r")
    p.members = SimpleNamespace(adverts=lambda run: adverts, progress=lambda run: progress)
    p.heard = {}
    return p


def _ad(peer, start_round=1, paused=False):
    return SimpleNamespace(peer_id=peer, start_round=start_round, paused=paused, timestamp=1.0)


def _pr(peer, rnd, state="training"):
    return SimpleNamespace(peer_id=peer, round=rnd, state=state)


def test_members_that_say_they_wont_come_are_gone_with_their_reason():
    p = _peer([_ad("me", 20), _ad("a"), _ad("b", paused=True), _ad("c", start_round=12), _ad("d", start_round=11)],
              [_pr("a", 10), _pr("e", 10, state="leaving"), _pr("me", 10, state="leaving")])
    assert p._gone(11) == {"b": "it paused", "c": "it joins at round 12", "e": "it is leaving"}


def test_peers_two_rounds_behind_are_left_out_of_the_plan():
    # x: stuck on round 7 (start round 7, no progress) while the swarm plans round 11; y: downloaded state of
    # round 10, joins at 11; z: committed round 9 a moment ago (its record may lag one round); w: new swarm
    adverts = [_ad("x", 7), _ad("y", 11), _ad("z", 1), _ad("w", 1), _ad("me", 1)]
    p = _peer(adverts, [_pr("z", 9)])
    assert p._behind(11, adverts) == {"x", "w"}
    assert p._behind(2, adverts) == set()  # round 1 of a new swarm: nobody has progress yet, nobody is behind


@pytest.fixture(scope="module")
def pair():
    from swarm.transport.hivemind_dht import HivemindTransport

    ts = [HivemindTransport(host="127.0.0.1")]
    ts.append(HivemindTransport(host="127.0.0.1", initial_peers=ts[0].visible_maddrs()))
    for t in ts:
        t.open_averaging(run="abandon", vector_size=vector_size(768), matchmaking_time=2.0, allreduce_timeout=20.0)
    yield ts
    for t in reversed(ts):
        t.shutdown()


def _round(t, rnd, abandon=None, grad=0.01, wait=30.0, lineage="0" * 64, plan="p", quotas=None):
    train = TrainResult(grads={"w": np.full(768, grad, dtype=np.float32)}, tokens=128, loss_sum=1.0, seconds=0.1)
    return average_round(t, train, names=["w"], shapes={"w": (768,)}, round_=rnd, plan_id=plan, group_size=2,
                         clip_norm=1.0, timeout=wait + 10, run="abandon", wait_until=t.now() + wait, abandon=abandon,
                         lineage=lineage, quotas=quotas)


def test_an_attempt_is_abandoned_as_soon_as_a_member_says_it_wont_come_and_the_averager_still_works(pair):
    a, b = pair
    said_at = time.monotonic() + 2.0
    start = time.monotonic()
    out = _round(a, 1, abandon=lambda: "peer b will not be in this round: it is leaving" if time.monotonic() > said_at else None)
    took = time.monotonic() - start
    assert not out.ok and out.reason == ABANDONED + "peer b will not be in this round: it is leaving"
    assert took < 6.0, f"waited {took:.1f}s for a member that said it won't come (deadline was 30 s away)"

    # the cancelled matchmaking left the averager usable: the next round averages normally
    results = {}
    threads = [threading.Thread(target=lambda t=t, g=g: results.__setitem__(t.peer_id, _round(t, 2, grad=g, wait=3.0)))
               for t, g in ((a, 0.01), (b, 0.03))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert all(r.ok for r in results.values()), [r.reason for r in results.values()]
    mean = {k: r.mean_grads["w"] for k, r in results.items()}
    np.testing.assert_allclose(mean[a.peer_id], 0.02, rtol=1e-5)
    assert np.array_equal(mean[a.peer_id], mean[b.peer_id])


def test_a_peer_whose_advert_stops_changing_is_silent_by_our_own_clock(monkeypatch):
    import swarm.peer as peer_mod

    clock = [1000.0]
    monkeypatch.setattr(peer_mod.time, "monotonic", lambda: clock[0])
    alive, dead = SimpleNamespace(peer_id="alive", start_round=1, paused=False, timestamp=5.0), \
        SimpleNamespace(peer_id="dead", start_round=1, paused=False, timestamp=9e9)  # its clock is far ahead: no matter
    p = _peer([alive, dead], [])
    assert p._silent([alive, dead]) == {}
    for _ in range(4):  # 20 s: the live peer refreshes its advert every 5 s, the dead one never again
        clock[0] += 5.0
        alive.timestamp += 5.0
        silent = p._silent([alive, dead])
    assert set(silent) == {"dead"} and silent["dead"] == pytest.approx(20.0)
    assert p._gone(3) == {"dead": "it stopped advertising 20s ago"}


def test_members_starting_from_different_states_never_average_together(pair):
    """The state's lineage is part of the group key: two peers on different chains find no group (nothing is
    summed, nothing committed); on the same lineage they average."""
    a, b = pair
    results = {}
    threads = [threading.Thread(target=lambda t=t, lin=lin: results.__setitem__(t.peer_id, _round(t, 5, wait=3.0, lineage=lin)))
               for t, lin in ((a, "a" * 64), (b, "b" * 64))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert len(results) == 2 and not any(r.ok for r in results.values()), [r.reason for r in results.values()]
    assert all(r.mean_grads is None for r in results.values())


def test_peers_whose_plans_differed_for_one_attempt_average_in_the_next(pair):
    """Plans come from each peer's own view of the DHT and may differ for a moment. Members naming another plan
    are refused in that attempt only: once both replanned alike, the next attempt of the same round averages
    (a refusal kept for the whole round left two honest peers refusing each other until the test timed out)."""
    a, b = pair
    quotas = {a.peer_id: 128, b.peer_id: 128}

    def attempt(plans, rnd=7):
        results = {}
        threads = [threading.Thread(target=lambda t=t, p=p: results.__setitem__(
                       t.peer_id, _round(t, rnd, wait=3.0, plan=p, quotas=quotas))) for t, p in zip((a, b), plans)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        return results

    first = attempt(["plan-a", "plan-b"])
    assert len(first) == 2 and not any(r.ok for r in first.values()), [r.reason for r in first.values()]
    second = attempt(["plan-a", "plan-a"])
    assert len(second) == 2 and all(r.ok for r in second.values()), [r.reason for r in second.values()]
    assert np.array_equal(second[a.peer_id].mean_grads["w"], second[b.peer_id].mean_grads["w"])


def test_banned_peers_are_planned_in_again_once_a_member_plans_the_round_otherwise():
    """A ban is one member's verdict; another honest member may not have reached it. Planning without the banned
    peer while that member plans with it, the two would never agree on a plan id (never average again). Once a
    round fails while a planned peer advertises another plan for it, the banned are planned in until the bans
    end, and still left out of the group."""
    adverts = [_ad("me"), _ad("a"), _ad("x")]
    p = _peer(adverts, [_pr("me", 4), _pr("a", 4), _pr("x", 4)])
    p._advert = lambda: adverts[0]
    p.missing, p.banned, p.plan_banned = {}, {"x": 12}, False
    assert sorted(a.peer_id for a in p.adverts(5)) == ["a", "me"]
    p.last_plan = SimpleNamespace(round=5, plan_id="mine", peer_ids=("a", "me"))
    for a in adverts:
        a.training_round, a.plan_id = 5, "mine"
    assert not p._plans_differ(5)
    adverts[1].plan_id = "theirs"  # a planned round 5 with x in
    assert p._plans_differ(5) and not p._plans_differ(6)
    p.plan_banned = True
    assert sorted(a.peer_id for a in p.adverts(5)) == ["a", "me", "x"]
