"""Unit tests of the pure round planner: tables of adverts in, plans out. No network, no torch."""

from __future__ import annotations

import json
import math
import random

import pytest

from swarm.config import RunConfig, TrainConfig
from swarm.planner import (
    GB,
    RoundPlan,
    RunOption,
    choose_run,
    fit_reason,
    needs_replan,
    plan_round,
)
from swarm.records import CapabilityAdvert


def run_config(tokens_per_round=6144, seq_len=128, micro_batch=8, name="default") -> RunConfig:
    return RunConfig(name=name, train=TrainConfig(tokens_per_round=tokens_per_round, seq_len=seq_len, micro_batch=micro_batch))


def advert(peer_id, speed=1000.0, util=1.0, mmb=8, run="default", start=0, paused=False, ts=1.0, usable=4 * GB, **kw):
    return CapabilityAdvert(
        peer_id=peer_id, run=run, backend="cpu", device="test", tier="test",
        memory_total_bytes=usable, memory_usable_bytes=usable, throughput_tokens_per_s=speed,
        max_utilization=util, max_micro_batch=mmb, start_round=start, paused=paused, timestamp=ts, **kw,
    )  # fmt: skip


def quotas(plan: RoundPlan) -> dict[str, int]:
    return {t.peer_id: t.sequences for t in plan.tasks}


def check_invariants(plan: RoundPlan, run: RunConfig) -> None:
    seq_len = run.train.seq_len
    assert [t.peer_id for t in plan.tasks] == sorted(t.peer_id for t in plan.tasks)
    assert sum(t.quota_tokens for t in plan.tasks) == plan.total_tokens
    for t in plan.tasks:
        assert t.quota_tokens == t.sequences * seq_len and t.sequences >= 1
        assert 1 <= t.micro_batch <= run.train.micro_batch
        assert t.accumulation_steps == math.ceil(t.sequences / t.micro_batch)
        assert 1 <= t.last_micro_batch <= t.micro_batch
        assert (t.accumulation_steps - 1) * t.micro_batch + t.last_micro_batch == t.sequences
        assert t.expected_seconds == pytest.approx(t.quota_tokens / t.effective_tokens_per_s)
        assert t.expected_seconds <= plan.predicted_seconds
        cap = run.averaging.round_timeout  # capped: a crawling advert must not stall the swarm
        assert min(plan.predicted_seconds, cap) <= plan.deadline_seconds <= cap
    json.dumps(plan.to_dict(), allow_nan=False)


# --- quotas follow speed -----------------------------------------------------------------------

# (case, adverts, expected sequences per peer) with the default budget of 6144 / 128 = 48 sequences
QUOTA_TABLE = [
    ("single peer gets everything", [advert("a")], {"a": 48}),
    ("equal speeds split evenly", [advert("a"), advert("b")], {"a": 24, "b": 24}),
    ("2:1 speed gives 2:1 quota", [advert("a", 2000), advert("b", 1000)], {"a": 32, "b": 16}),
    ("max_utilization 0.5 halves speed", [advert("a", 1000), advert("b", 1000, util=0.5)], {"a": 32, "b": 16}),
    ("utilization and throughput combine", [advert("a", 1000, util=0.5), advert("b", 500)], {"a": 24, "b": 24}),
    ("3:2:1", [advert("a", 300), advert("b", 200), advert("c", 100)], {"a": 24, "b": 16, "c": 8}),
    # 48/5 = 9.6 each: 9 each + 3 leftover sequences to the first three ids (equal remainders)
    ("ties broken by peer id", [advert(p) for p in "edcba"], {"a": 10, "b": 10, "c": 10, "d": 9, "e": 9}),
    # a near-idle peer still gets one sequence; the rest goes to the fast one
    ("slow peer gets at least one", [advert("a", 1e6), advert("b", 1.0)], {"a": 47, "b": 1}),
    ("tier mix: 4090, M2, laptop", [advert("rtx", 9000), advert("m2", 2400), advert("cpu", 600)], {"rtx": 36, "m2": 10, "cpu": 2}),
]


@pytest.mark.parametrize("case,ads,expected", QUOTA_TABLE, ids=[c[0] for c in QUOTA_TABLE])
def test_quotas(case, ads, expected):
    run = run_config()
    plan = plan_round(run, ads, 0)
    check_invariants(plan, run)
    assert quotas(plan) == expected
    assert plan.total_tokens == 6144
    assert not plan.excluded and plan.reason is None


def pinned_shares(weights: list[float], total: int) -> list[float]:
    """Reference (float) shares: peers below one sequence are pinned at one, the rest re-split."""
    pinned: set[int] = set()
    while True:
        free = [i for i in range(len(weights)) if i not in pinned]
        rest = total - len(pinned)
        wsum = sum(weights[i] for i in free)
        low = {i for i in free if rest * weights[i] / wsum < 1}
        if not low:
            return [1.0 if i in pinned else rest * weights[i] / wsum for i in range(len(weights))]
        pinned |= low


def test_quotas_within_one_sequence_of_proportional_share():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 9)
        run = run_config(tokens_per_round=128 * rng.randint(n, 200))
        ads = [advert(f"p{i}", speed=rng.choice([rng.uniform(50, 5000), 1.0]), util=rng.choice([1.0, 0.5, 0.25])) for i in range(n)]
        plan = plan_round(run, ads, 0)
        check_invariants(plan, run)
        total = run.train.tokens_per_round // 128
        assert plan.total_tokens == total * 128
        shares = pinned_shares([a.throughput_tokens_per_s * a.max_utilization for a in ads], total)
        for share, a in zip(shares, ads):
            assert abs(plan.task_for(a.peer_id).sequences - share) < 1.0


def test_expected_times_balanced():
    """Negotiated quotas make the fast and the capped peer finish within one sequence of each other."""
    run = run_config()
    plan = plan_round(run, [advert("fast", 1000), advert("half", 1000, util=0.5)], 0)
    times = [t.expected_seconds for t in plan.tasks]
    assert max(times) - min(times) <= 128 / 500
    uniform = plan_round(run, [advert("fast", 1000), advert("half", 1000, util=0.5)], 0, mode="uniform")
    assert quotas(uniform) == {"fast": 24, "half": 24}
    assert uniform.predicted_seconds == pytest.approx(24 * 128 / 500)
    assert plan.predicted_seconds < uniform.predicted_seconds


# --- budget rounding -------------------------------------------------------------------------

BUDGET_TABLE = [
    # (tokens_per_round, seq_len, peers, expected total sequences)
    (6144, 128, 3, 48),
    (6143, 128, 3, 48),  # rounded half up to whole sequences
    (6207, 128, 3, 48),  # 48.49 -> 48
    (6208, 128, 3, 49),  # 48.5 -> 49
    (8, 128, 1, 1),  # at least one sequence
    (256, 128, 5, 5),  # more peers than sequences: one each, the budget is exceeded
]


@pytest.mark.parametrize("tokens,seq_len,n,expected", BUDGET_TABLE)
def test_budget_in_whole_sequences(tokens, seq_len, n, expected):
    run = run_config(tokens_per_round=tokens, seq_len=seq_len)
    plan = plan_round(run, [advert(f"p{i}", 100 * (i + 1)) for i in range(n)], 0)
    check_invariants(plan, run)
    assert plan.total_tokens == expected * seq_len
    assert len(plan.tasks) == n


# --- micro-batches respect memory --------------------------------------------------------------

MICRO_TABLE = [
    # (config micro_batch, advert max_micro_batch, sequences in quota, micro_batch, accumulation, last)
    (8, 8, 48, 8, 6, 8),
    (8, 3, 48, 3, 16, 3),
    (8, 5, 48, 5, 10, 3),  # 48 = 9 x 5 + 3: last micro-batch short
    (4, 64, 48, 4, 12, 4),  # the config caps a peer with lots of memory
    (8, 8, 3, 3, 1, 3),  # a small quota caps the micro-batch
    (8, 1, 7, 1, 7, 1),  # memory tier that fits only micro-batch 1
]


@pytest.mark.parametrize("cfg_mb,max_mb,seqs,mb,accum,last", MICRO_TABLE)
def test_micro_batch_and_accumulation(cfg_mb, max_mb, seqs, mb, accum, last):
    run = run_config(tokens_per_round=128 * seqs, micro_batch=cfg_mb)
    plan = plan_round(run, [advert("a", mmb=max_mb)], 0)
    check_invariants(plan, run)
    (t,) = plan.tasks
    assert (t.sequences, t.micro_batch, t.accumulation_steps, t.last_micro_batch) == (seqs, mb, accum, last)


def test_memory_caps_do_not_change_quotas():
    """Quotas follow speed only; a small-memory peer just accumulates more micro-batches."""
    run = run_config()
    plan = plan_round(run, [advert("big", 1000, mmb=64), advert("small", 1000, mmb=2)], 0)
    check_invariants(plan, run)
    assert quotas(plan) == {"big": 24, "small": 24}
    assert (plan.task_for("big").micro_batch, plan.task_for("big").accumulation_steps) == (8, 3)
    assert (plan.task_for("small").micro_batch, plan.task_for("small").accumulation_steps) == (2, 12)


# --- exclusions ----------------------------------------------------------------------------

EXCLUDE_TABLE = [
    ("paused", advert("x", paused=True), "paused"),
    ("not yet started", advert("x", start=5), "not_started"),
    ("does not fit", advert("x", mmb=0, usable=1 * GB), "does_not_fit"),
    ("wrong run", advert("x", run="other"), "wrong_run"),
    ("no throughput", advert("x", speed=0.0), "no_throughput"),
]


@pytest.mark.parametrize("case,bad,reason", EXCLUDE_TABLE, ids=[c[0] for c in EXCLUDE_TABLE])
def test_excluded_with_reason(case, bad, reason):
    run = run_config()
    plan = plan_round(run, [advert("a"), bad], 3)
    check_invariants(plan, run)
    assert plan.peer_ids == ("a",) and quotas(plan) == {"a": 48}
    (e,) = plan.excluded
    assert (e.peer_id, e.reason) == ("x", reason) and e.detail
    assert plan.task_for("x") is None and plan.exclusion_for("x") == e
    assert plan.to_dict()["excluded"] == [{"peer_id": "x", "reason": reason, "detail": e.detail}]


ALL = ("fp32", "bf16", "fp16", "nf4")
# (case, the run's train.precisions, the advert's fields, reason code or None (planned in), words of the detail)
PRECISION_TABLE = [
    ("fp32 peer, run allows all", ALL, {}, None, ""),
    ("4-bit peer that fits", ALL, dict(precision="nf4", precisions=["fp32", "bf16", "nf4"]), None, ""),
    ("4-bit with checkpointing that fits", ("nf4",), dict(precision="nf4", precisions=["nf4"], checkpointing=True), None, ""),
    ("names a newer peer adds are no obstacle", ALL, dict(precisions=["fp32", "fp8"]), None, ""),
    ("runs none of the allowed", ("nf4",), dict(precisions=["fp32", "bf16"]), "no_precision",
     "allows (nf4); its platform runs fp32, bf16"),
    ("trains in one the run does not allow", ("bf16", "nf4"), dict(precision="fp32", precisions=["fp32", "bf16"]),
     "precision_not_allowed", "trains in fp32, which the run does not allow (bf16, nf4)"),
    ("a newer peer's unknown precision", ("fp32",), dict(precision="fp8", precisions=["fp8", "fp32"]),
     "precision_not_allowed", "trains in fp8"),
    ("fits no allowed option: the least it needs", ALL,
     dict(precision="nf4", precisions=["fp32", "bf16", "nf4"], checkpointing=True, mmb=0, usable=2 * GB,
          memory_needed_bytes=int(2.5 * GB)),
     "does_not_fit", "fits no allowed option: micro-batch 1 needs 2.50 GB as nf4 with gradient checkpointing, it has 2.00 GB usable"),
    ("an older peer that says no need", ALL, dict(mmb=0, usable=1 * GB), "does_not_fit", "does not fit its 1.0 GB usable memory"),
]


@pytest.mark.parametrize("case,allowed,fields,reason,words", PRECISION_TABLE, ids=[c[0] for c in PRECISION_TABLE])
def test_precision_eligibility(case, allowed, fields, reason, words):
    run = RunConfig(train=TrainConfig(precisions=allowed))
    plan = plan_round(run, [advert("a", precision=allowed[0], precisions=list(allowed)), advert("x", **fields)], 2)
    check_invariants(plan, run)
    assert plan.task_for("a") is not None
    e = plan.exclusion_for("x")
    assert (e.reason if e else None) == reason and (plan.task_for("x") is None) == (reason is not None)
    assert words in (e.detail if e else "")
    # needs_replan agrees with the plan on who is eligible under the run's list
    assert not needs_replan(plan, [advert("a", precision=allowed[0], precisions=list(allowed)), advert("x", **fields)], 2,
                            allowed=allowed)


def test_start_round_reached():
    run = run_config()
    late = advert("b", start=5)
    assert plan_round(run, [advert("a"), late], 4).peer_ids == ("a",)
    assert plan_round(run, [advert("a"), late], 5).peer_ids == ("a", "b")


def test_does_not_fit_detail_has_memory():
    plan = plan_round(run_config(), [advert("x", mmb=0, usable=2 * GB)], 0)
    assert "2.0 GB" in plan.excluded[0].detail


def test_everyone_excluded_gives_empty_plan_with_reason():
    run = run_config()
    plan = plan_round(run, [advert("a", paused=True), advert("b", mmb=0), advert("c", mmb=0)], 0)
    assert plan.empty and plan.tasks == () and plan.total_tokens == 0 and plan.deadline_seconds == 0.0
    assert plan.reason == "no eligible peers (3 excluded; does not fit: 2, paused: 1)"
    assert [e.peer_id for e in plan.excluded] == ["a", "b", "c"]
    json.dumps(plan.to_dict(), allow_nan=False)
    empty = plan_round(run, [], 0)
    assert empty.empty and empty.reason == "no eligible peers: no adverts"


def test_duplicate_peer_id_keeps_newest_advert():
    run = run_config()
    old, new = advert("a", 1000, ts=1.0), advert("a", 3000, ts=2.0)
    ads = [old, new, advert("b", 1000)]
    for order in (ads, ads[::-1]):
        plan = plan_round(run, order, 0)
        assert quotas(plan) == {"a": 36, "b": 12}


# --- determinism -----------------------------------------------------------------------------


def test_shuffled_adverts_give_identical_plan():
    rng = random.Random(1234)
    ads = [advert(f"peer-{i:02d}", speed=rng.uniform(10, 10000), util=rng.choice([1.0, 0.7, 0.5]), mmb=rng.randint(0, 16))
           for i in range(12)]  # fmt: skip
    ads += [advert("paused", paused=True), advert("later", start=9), advert("elsewhere", run="other")]
    run = run_config(tokens_per_round=128 * 101)
    ref = plan_round(run, ads, 2, previous_round_seconds=3.0)
    check_invariants(ref, run)
    for _ in range(50):
        shuffled = ads[:]
        rng.shuffle(shuffled)
        plan = plan_round(run, shuffled, 2, previous_round_seconds=3.0)
        assert plan == ref and plan.plan_id == ref.plan_id
        assert json.dumps(plan.to_dict()) == json.dumps(ref.to_dict())


def test_plan_id_stable_and_sensitive():
    run = run_config()
    ads = [advert("a", 2000), advert("b", 1000)]
    base = plan_round(run, ads, 0)
    assert len(base.plan_id) == 12 and base.plan_id == plan_round(run, list(reversed(ads)), 0).plan_id
    # rebuilt adverts (e.g. parsed again from the wire) give the same id
    assert plan_round(run, [CapabilityAdvert.model_validate(a.to_wire()) for a in ads], 0).plan_id == base.plan_id
    # a locally measured round time moves the deadline, not what peers must agree on
    assert plan_round(run, ads, 0, previous_round_seconds=100.0).plan_id == base.plan_id
    different = [
        plan_round(run, ads + [advert("c")], 0),  # join
        plan_round(run, ads[:1], 0),  # leave
        plan_round(run, ads, 1),  # next round
        plan_round(run, ads, 0, mode="uniform"),
        plan_round(run, [advert("a", 1000), advert("b", 1000)], 0),  # speeds moved the quotas
        plan_round(run, [advert("a", 2000, mmb=2), advert("b", 1000)], 0),  # memory moved a micro-batch
    ]
    ids = {p.plan_id for p in different}
    assert base.plan_id not in ids and len(ids) == len(different)


# --- re-planning ------------------------------------------------------------------------------

ADS = [advert("a", 2000), advert("b", 1000), advert("c", 1000, util=0.5)]
REPLAN_TABLE = [
    ("same adverts", ADS, False),
    ("same adverts, refreshed timestamps", [a.model_copy(update={"timestamp": 9.0}) for a in ADS], False),
    ("peer joins", ADS + [advert("d")], True),
    ("peer leaves (advert expired)", ADS[:2], True),
    ("peer pauses", [ADS[0], ADS[1], advert("c", 1000, util=0.5, paused=True)], True),
    ("joiner not started yet", ADS + [advert("d", start=7)], False),
    ("small drift (20%)", [advert("a", 1600), ADS[1], ADS[2]], False),
    ("drift over 25% slower", [advert("a", 1400), ADS[1], ADS[2]], True),
    ("drift over 25% faster", [ADS[0], advert("b", 1300), ADS[2]], True),
    ("throttled by utilization", [ADS[0], advert("b", 1000, util=0.5), ADS[2]], True),
    ("memory shrank below planned micro-batch", [ADS[0], advert("b", 1000, mmb=4), ADS[2]], True),
    ("memory grew", [ADS[0], advert("b", 1000, mmb=32), ADS[2]], False),
    ("advert from another run", ADS + [advert("z", run="other")], False),
]


@pytest.mark.parametrize("case,new_ads,expected", REPLAN_TABLE, ids=[c[0] for c in REPLAN_TABLE])
def test_needs_replan(case, new_ads, expected):
    old = plan_round(run_config(), ADS, 0)
    assert needs_replan(old, new_ads, 0) is expected


def test_needs_replan_threshold_and_empty_plans():
    old = plan_round(run_config(), ADS, 0)
    slower = [advert("a", 1600), ADS[1], ADS[2]]
    assert needs_replan(old, slower, 0, drift=0.1) is True
    assert needs_replan(old, slower, 0, drift=0.25) is False
    empty = plan_round(run_config(), [], 0)
    assert needs_replan(empty, [], 0) is False
    assert needs_replan(empty, ADS, 0) is True
    assert needs_replan(old, [], 0) is True


# --- deadlines ----------------------------------------------------------------------------

DEADLINE_TABLE = [
    # (previous_round_seconds, expected deadline) for a predicted 6144 / 1000 = 6.144 s round
    (None, 6.144 * 1.5 + 2.0),
    (3.0, 6.144 * 1.5 + 2.0),  # faster than predicted: the prediction stands
    (10.0, 10.0 * 1.5 + 2.0),  # slower than predicted: the deadline adapts
    (0.0, 6.144 * 1.5 + 2.0),
]


@pytest.mark.parametrize("previous,expected", DEADLINE_TABLE)
def test_deadline(previous, expected):
    plan = plan_round(run_config(), [advert("a", 1000)], 0, previous_round_seconds=previous)
    assert plan.predicted_seconds == pytest.approx(6.144)
    assert plan.deadline_seconds == pytest.approx(expected)


def test_deadline_slack_and_margin():
    plan = plan_round(run_config(), [advert("a", 1000)], 0, slack=2.0, margin_seconds=0.0)
    assert plan.deadline_seconds == pytest.approx(6.144 * 2.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"round": -1}, {"mode": "greedy"}, {"slack": 0.5}, {"margin_seconds": -1.0}, {"previous_round_seconds": float("nan")}],
)
def test_bad_arguments_raise(kwargs):
    args = {"round": 0, **kwargs}
    with pytest.raises(ValueError):
        plan_round(run_config(), [advert("a")], **args)


# --- uniform mode ---------------------------------------------------------------------------


def test_uniform_mode_ignores_speed():
    run = run_config()
    ads = [advert("a", 9000), advert("b", 100), advert("c", 1000, util=0.5)]
    plan = plan_round(run, ads, 0, mode="uniform")
    check_invariants(plan, run)
    assert plan.mode == "uniform" and quotas(plan) == {"a": 16, "b": 16, "c": 16}
    assert plan.task_for("b").expected_seconds == pytest.approx(16 * 128 / 100)
    assert plan.predicted_seconds == pytest.approx(16 * 128 / 100)
    # remainders in uniform mode also go by peer id
    assert quotas(plan_round(run_config(tokens_per_round=128 * 50), ads, 0, mode="uniform")) == {"a": 17, "b": 17, "c": 16}


def test_to_dict_is_json_safe():
    plan = plan_round(run_config(), [advert("a", 2000), advert("b", 1000, mmb=3), advert("z", paused=True)], 4)
    d = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert d["round"] == 4 and d["plan_id"] == plan.plan_id and d["total_tokens"] == 6144
    assert [t["peer_id"] for t in d["tasks"]] == ["a", "b"]
    assert d["tasks"][1] == {
        "peer_id": "b", "quota_tokens": 16 * 128, "sequences": 16, "micro_batch": 3, "accumulation_steps": 6,
        "expected_seconds": 16 * 128 / 1000, "effective_tokens_per_s": 1000.0,
    }  # fmt: skip
    assert d["excluded"] == [{"peer_id": "z", "reason": "paused", "detail": "paused by its owner"}]


def test_plan_is_frozen():
    plan = plan_round(run_config(), [advert("a")], 0)
    with pytest.raises(AttributeError):
        plan.round = 3  # type: ignore[misc]


# --- run discovery -------------------------------------------------------------------------

RUNS = [
    RunOption("tiny", 10_000_000, int(0.5 * GB)),
    RunOption("small", 500_000_000, int(3.2 * GB)),
    RunOption("large", 7_000_000_000, int(14 * GB)),
]
CHOOSE_TABLE = [
    ("roomy machine takes the largest", RUNS, 24 * GB, "large"),
    ("mid machine", RUNS, 8 * GB, "small"),
    ("exactly enough", RUNS, int(3.2 * GB), "small"),
    ("small machine", RUNS, 1 * GB, "tiny"),
    ("precomputed fits overrides bytes", [RunOption("tiny", 10, 1, fits=False), RunOption("big", 100, 10 * GB, fits=True)], GB, "big"),
    ("dicts and tuples", [{"run_name": "a", "params": 5, "bytes_needed": 1}, ("b", 7, 2)], GB, "b"),
    ("equal sizes: smallest name", [("zeta", 5, 1), ("alpha", 5, 1)], GB, "alpha"),
]


@pytest.mark.parametrize("case,runs,usable,expected", CHOOSE_TABLE, ids=[c[0] for c in CHOOSE_TABLE])
def test_choose_run(case, runs, usable, expected):
    choice = choose_run(runs, usable)
    assert choice.run == expected and repr(expected) in choice.reason
    assert choose_run(list(reversed(runs)), usable) == choice


def test_choose_run_nothing_fits():
    choice = choose_run(RUNS, int(0.3 * GB))
    assert choice.run is None
    assert choice.reason.endswith("'tiny', needs 0.5 GB, has 0.3 GB")
    assert fit_reason(int(3.2 * GB), 2 * GB) == "needs 3.2 GB, has 2.0 GB"
    none = choose_run([], 8 * GB)
    assert none.run is None and "no runs" in none.reason


def test_one_crawling_advert_cannot_stall_the_round():
    """Security review, scenario 4: an advert of 0.001 tokens/s gave a deadline of ~2 days; it is capped at
    averaging.round_timeout (the crawling peer contributes what it has by then)."""
    from swarm.config import default_run
    from swarm.records import CapabilityAdvert

    run = default_run()

    def advert(pid, speed):
        return CapabilityAdvert(peer_id=pid, run=run.name, backend="cpu", device="cpu", tier="sweet-spot",
                                memory_total_bytes=8 << 30, memory_usable_bytes=4 << 30, throughput_tokens_per_s=speed,
                                max_micro_batch=8, timestamp=1.0)

    plan = plan_round(run, [advert("a", 1000.0), advert("b", 1000.0), advert("x", 0.001)], 1)
    assert plan.task_for("x") is not None and plan.deadline_seconds == run.averaging.round_timeout
    fast = plan_round(run, [advert("a", 1000.0), advert("b", 1000.0)], 1)
    assert fast.deadline_seconds < run.averaging.round_timeout
