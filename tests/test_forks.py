"""Rounds never fork: lineages, the fork rule, the majority rule, the wait before round 1 (pure parts)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from swarm.backends.base import OptimizerState
from swarm.checkpoint import StateError, TrainingState, genesis_lineage
from swarm.planner import PeerTask, RoundPlan
from swarm.records import CapabilityAdvert, ProgressRecord
from swarm.round import RoundOutcome
from swarm.agreement import chain_of, heavier, lost_work, relation
from swarm.settings import PeerSettings
from swarm.sync import StateSync

SHAPES = {"m.lora_A": (2, 4), "m.lora_B": (4, 2)}


def _genesis(seed=0) -> TrainingState:
    rng = np.random.default_rng(seed)
    adapter = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    return TrainingState(round=0, adapter=adapter, optimizer=OptimizerState(step=0), fingerprint="fp")


def _step(state: TrainingState, update: str, tokens: int = 100, speeds=None) -> TrainingState:
    adapter = {n: a + 0.01 for n, a in state.adapter.items()}
    return state.successor(round_=state.round + 1, adapter=adapter, optimizer=OptimizerState(step=state.round + 1,
                           exp_avg={n: a * 0 for n, a in adapter.items()}, exp_avg_sq={n: a * 0 for n, a in adapter.items()}),
                           update_sha256=update * 64, tokens=tokens, speeds=speeds or {"p": 10.0}, round_seconds=1.5)


def test_lineage_is_a_chain_over_updates_work_and_pace():
    g = _genesis()
    assert g.lineage == genesis_lineage("fp", g.adapter_sha256) and g.verified_lineage()
    a1, b1 = _step(g, "a"), _step(g, "b")
    assert a1.lineage != b1.lineage and a1.parent == b1.parent == g.lineage      # a fork at round 1
    assert a1.work == 100 and _step(a1, "a").work == 200
    assert a1.ancestry == {0: (g.lineage, 0), 1: (a1.lineage, 100)}
    assert _step(g, "a", speeds={"p": 11.0}).lineage != a1.lineage              # the pace is inside the hash
    assert _step(g, "a").lineage == a1.lineage                                   # deterministic


def test_downloaded_state_with_tampered_pace_or_work_is_rejected():
    s = _step(_step(_genesis(), "a"), "c")
    meta, arrays = s.to_wire()
    back = TrainingState.from_wire(meta, arrays, SHAPES, "fp", source="peer x")
    assert back.lineage == s.lineage and back.work == s.work and back.speeds == s.speeds
    for key, value in (("speeds", {"p": 1e6}), ("work", 10 ** 9), ("round_seconds", 3000.0), ("lineage", "0" * 64)):
        bad = dict(meta, **{key: value})
        with pytest.raises(StateError, match="lineage"):
            TrainingState.from_wire(bad, arrays, SHAPES, "fp", source="peer x")
    with pytest.raises(StateError, match="bad lineage"):
        TrainingState.from_wire(dict(meta, work="12"), arrays, SHAPES, "fp", source="peer x")


def test_relation_and_the_heaviest_chain_rule():
    assert relation({3: "x", 4: "y"}, {4: "y", 5: "z"}) is True
    assert relation({3: "x", 4: "y"}, {4: "q"}) is False
    assert relation({1: "x"}, {9: "x"}) is None
    assert heavier((200, "ff"), (100, "00"))                 # more work wins
    assert heavier((100, "0a"), (100, "0b")) and not heavier((100, "0b"), (100, "0a"))  # tie: the smaller hash
    assert not heavier((100, "0a"), (100, "0a"))


def test_lost_work_counts_the_rounds_after_the_split():
    g = _genesis()
    mine = _step(_step(_step(g, "a"), "b"), "c")             # rounds 1..3: a b c
    theirs = _step(_step(_step(_step(g, "a"), "x"), "y"), "z")  # split after round 1
    assert lost_work(mine, theirs) == {"lost_rounds": 2, "lost_tokens": 200}
    assert lost_work(mine, _step(_genesis(seed=5), "q")) == {"lost_rounds": 3, "lost_tokens": 300}  # nothing shared


def test_any_adoption_off_this_peers_chain_counts_as_lost_work():
    """However a peer learns its chain lost (a fork seen, a round committed without it, a disagreement), adopting
    state that does not descend from its own reports the lost rounds; catching up along its own chain loses nothing."""
    g = _genesis()
    a1 = _step(g, "a")
    mine = _step(_step(a1, "b"), "c")                            # rounds 1..3: a b c
    ahead = _step(_step(mine, "d"), "e")                         # the same chain, two rounds on
    theirs = _step(_step(_step(_step(a1, "x"), "y"), "z"), "w")  # split after round 1
    assert StateSync._lost_to(mine, ahead) is None
    assert StateSync._lost_to(mine, theirs) == {"lost_rounds": 2, "lost_tokens": 200}
    assert StateSync._lost_to(None, theirs) is None and StateSync._lost_to(g, theirs) is None  # nothing trained yet
    older = dict(theirs.ancestry)
    theirs.ancestry = {r: v for r, v in older.items() if r > 3}  # remembers too few rounds to tell: no claim
    assert StateSync._lost_to(mine, theirs) is None


class _Members:
    def __init__(self, progress, adverts=()):
        self._progress, self._adverts = progress, list(adverts)

    def progress(self, run):
        return self._progress

    def adverts(self, run):
        return self._adverts


def _record(peer, st: TrainingState, **kw) -> ProgressRecord:
    recent = sorted(st.ancestry)[-8:]
    kw.setdefault("history", {str(st.round): st.state_sha256})
    return ProgressRecord(peer_id=peer, round=st.round, adapter_sha256=st.adapter_sha256, lineage=st.lineage,
                          work=st.work, lineages={str(r): st.ancestry[r][0] for r in recent}, timestamp=1.0, **kw)


def _advert(peer, **kw) -> CapabilityAdvert:
    base = dict(peer_id=peer, run="r", backend="cpu", device="x", tier="cpu-only", memory_total_bytes=10, memory_usable_bytes=5,
                throughput_tokens_per_s=100.0, max_micro_batch=4, timestamp=1.0)
    return CapabilityAdvert(**{**base, **kw})


def _sync(me: str, state: TrainingState, progress, live=()) -> StateSync:
    s = StateSync()
    s.me, s.state, s.banned = me, state, {}
    s.run = types.SimpleNamespace(name="r", train=types.SimpleNamespace(tokens_per_round=1000, seq_len=64))
    s.members = _Members(progress, [_advert(p) for p in live])
    s._silent = lambda adverts: {}
    return s


def test_a_peer_yields_only_to_a_heavier_live_chain():
    g = _genesis()
    light = _step(_step(g, "a"), "b")
    heavy = _step(_step(_step(g, "x"), "y"), "z")
    # the lighter side sees the heavier head and yields to it
    s = _sync("me", light, [_record("h1", heavy)], live=["h1"])
    assert s.losing_fork().peer_id == "h1"
    # the heavier side never yields to the lighter one
    assert _sync("me", heavy, [_record("l1", light)], live=["l1"]).losing_fork() is None
    # a chain-mate ahead of this peer makes its chain heavier than the rival: no yielding behind one's own head
    mate = _step(_step(light, "c"), "d")
    assert _sync("me", light, [_record("h1", heavy), _record("m1", mate)], live=["h1", "m1"]).losing_fork() is None
    # a rival that is not live (no advert), leaving, or claims impossible work is not chased
    assert _sync("me", light, [_record("h1", heavy)], live=[]).losing_fork() is None
    assert _sync("me", light, [_record("h1", heavy, state="leaving")], live=["h1"]).losing_fork() is None
    liar = _record("h1", heavy).model_copy(update={"work": 10 ** 9})
    assert _sync("me", light, [liar], live=["h1"]).losing_fork() is None
    # rounds of a rival chain are not the swarm's round for this peer
    assert _sync("me", light, [_record("h1", heavy)], live=["h1"])._swarm_round() == 0
    assert _sync("me", light, [_record("m1", mate)], live=["m1"])._swarm_round() == 4


def test_chain_of_a_record():
    s = _step(_step(_genesis(), "a"), "b")
    assert chain_of(_record("p", s)) == {r: lin for r, (lin, _) in s.ancestry.items()}


def _plan(ids):
    tasks = tuple(PeerTask(p, 64, 1, 1, 1, 1.0, 64.0) for p in ids)
    return RoundPlan(run="r", round=1, mode="negotiated", plan_id="x", seq_len=64, tasks=tasks, total_tokens=64 * len(ids),
                     predicted_seconds=1.0, deadline_seconds=3.0, excluded=())


def test_only_a_strict_majority_of_the_plan_commits():
    from swarm.peer import Peer

    peer = Peer()
    peer.me, peer.banned, peer.last_group = "a", {}, []
    gone: dict[str, str] = {}
    peer._gone = lambda rnd: gone
    ok = lambda members: RoundOutcome(ok=True, members=members)  # noqa: E731
    assert peer._minority(_plan("abc"), ok(["a", "b"]), 1) is None
    assert "not a majority" in peer._minority(_plan("abc"), ok(["a"]), 1)
    assert "not a majority" in peer._minority(_plan("abcd"), ok(["a", "b"]), 1)   # 2 of 4 is not a majority
    assert peer._minority(_plan("a"), ok(["a"]), 1) is None                       # a plan of one commits alone
    peer.banned = {"d": 10}                                                        # rejected for cause: not counted
    assert peer._minority(_plan("abcd"), ok(["a", "b"]), 1) is None
    peer.banned = {}
    # a plan of one, but the last group's other members are live: this peer's view lags, it must not commit alone
    peer.last_group = ["a", "b", "c"]
    assert "not a majority of the 3" in peer._minority(_plan("a"), ok(["a"]), 1)
    assert peer._minority(_plan("ab"), ok(["a", "b"]), 1) is None                 # 2 of {a, b, c}
    gone.update(b="it is leaving", c="it stopped advertising 20s ago")            # they left: alone is all there is
    assert peer._minority(_plan("a"), ok(["a"]), 1) is None


def test_round_one_waits_for_visible_peers_still_loading():
    from swarm.peer import Peer

    peer = Peer()
    peer.me, peer.log = "a", types.SimpleNamespace(say=lambda *a, **k: None)
    peer.settings = PeerSettings(min_peers=1)
    me = _advert("a")
    assert peer._wait_before_round_one([me, _advert("b", loading=True)])          # b is visible, still loading
    assert not peer._wait_before_round_one([me, _advert("b")])                     # b is ready: plan with it
    # round 1 already under way elsewhere: no waiting (the plan check decides whether to join or catch up)
    assert not peer._wait_before_round_one([me, _advert("b", loading=True), _advert("c", training_round=1)])
    peer.settings = PeerSettings(min_peers=3)
    assert peer._wait_before_round_one([me, _advert("b")])


def test_round_one_under_way_counts_only_peers_of_this_peers_plan():
    """An outsider (paused, or in nobody's plan) advertising round 1 with a plan of its own made a joiner wait for a
    round 1 that never came; a planned peer training round 1 with another plan still sends it to catch up."""
    from swarm.agreement import round_one_started_without

    x = _advert("x", training_round=1)
    x = x.model_copy(update={"plan_id": "its-own"})
    ads = [_advert("a"), _advert("b"), x]
    assert round_one_started_without(ads, me="a", plan_id="ours")                          # (no plan given: any)
    assert not round_one_started_without(ads, me="a", plan_id="ours", planned=("a", "b"))  # x is not in our plan
    assert round_one_started_without(ads, me="a", plan_id="ours", planned=("a", "b", "x"))


def test_state_of_a_round_nobody_vouches_for_is_never_adopted():
    """Security review, scenario 2: with no peer past round R, confirmed() said True, so a far-future round was adopted."""
    g = _genesis()
    s1 = _step(g, "a")
    assert _sync("me", g, []).confirmed(10 ** 9, s1.adapter_sha256, s1.lineage) is False
    assert _sync("me", g, [_record("p", g)]).confirmed(1, s1.state_sha256, s1.lineage) is False
    assert _sync("me", g, [_record("p", s1)]).confirmed(1, s1.state_sha256, s1.lineage) is True
    # a finished run: only peers that left after round 1 report it; they vouch for its final state
    assert _sync("me", g, [_record("p", s1, state="leaving")]).confirmed(1, s1.state_sha256, s1.lineage) is True


def test_the_vote_covers_the_optimizer_and_its_invariants_are_checked():
    """Security review, item 9: the majority's adapter with other optimizer moments is another state; negative
    second moments, or more optimizer steps than rounds, are refused on download (no re-download loop)."""
    s1 = _step(_genesis(), "a")
    poisoned = TrainingState(round=1, adapter=s1.adapter, fingerprint="fp", lineage=s1.lineage, parent=s1.parent,
                             update_sha256=s1.update_sha256, work=s1.work, speeds=s1.speeds, round_seconds=s1.round_seconds,
                             optimizer=OptimizerState(step=1, exp_avg={n: a + 1 for n, a in s1.optimizer.exp_avg.items()},
                                                      exp_avg_sq=s1.optimizer.exp_avg_sq))
    assert poisoned.adapter_sha256 == s1.adapter_sha256 and poisoned.state_sha256 != s1.state_sha256
    honest = [_record(p, s1) for p in ("a", "b")]
    assert _sync("me", s1, honest).confirmed(1, poisoned.state_sha256, s1.lineage) is None  # rejected, source distrusted
    meta, arrays = s1.to_wire()
    neg = [a.copy() for a in arrays]
    neg[-1][0, 0] = -1.0
    with pytest.raises(StateError, match="negative"):
        TrainingState.from_wire(meta, neg, SHAPES, "fp", source="peer x")
    with pytest.raises(StateError, match="past its round"):
        TrainingState.from_wire(dict(meta, optimizer_step=5), arrays, SHAPES, "fp", source="peer x")


def test_sybil_votes_count_only_for_members_of_recent_groups():
    """Security review, item 3: fresh identities' progress records outvote nobody. A peer that has been in groups
    counts only their members; a joiner also needs a majority of the group the state names."""
    g = _genesis()
    s1 = _step(g, "a", speeds={"a": 10.0, "b": 10.0, "me": 10.0})
    fake = _step(g, "f", speeds={"a": 10.0, "b": 10.0, "me": 10.0})
    honest = [_record(p, s1) for p in ("a", "b")]
    # Sybils on the same chain (copied lineages) that report another state hash for round 1
    sybils = [_record(f"sybil{i}", s1, history={"1": fake.state_sha256}) for i in range(6)]
    running = _sync("me", s1, honest + sybils)
    running.groups = {1: frozenset({"a", "b", "me"})}
    running.history = {1: s1.state_sha256}
    running.backend = types.SimpleNamespace(name="torch")
    assert running.disagreement() is None                                        # the Sybils do not count
    assert running.confirmed(1, s1.state_sha256, s1.lineage) is True
    assert running.confirmed(1, fake.state_sha256, s1.lineage) is None
    running.groups = {}
    assert running.disagreement() == 1                                           # (as before: they would)
    # a joiner: the state's own group must vouch for it (here the fake names a, b, me: they do not)
    joiner = _sync("me", g, honest + sybils)
    assert joiner.confirmed(1, fake.state_sha256, s1.lineage) is True           # (as before: a joiner is outvoted)
    assert joiner.confirmed(1, fake.state_sha256, s1.lineage, group=set(fake.speeds)) is False
