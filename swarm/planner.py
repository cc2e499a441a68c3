"""The round planner: a pure, deterministic function from the run's settings and the live adverts
to who trains how much in one round.

No coordinator decides anything: every peer reads the same adverts from the DHT and calls
`plan_round`, and because the planner sorts by peer id before any arithmetic and splits the budget
with exact rational arithmetic (`fractions.Fraction`, i.e. integers), every peer that sees the same
adverts gets the same plan and the same `plan_id`. There is no I/O here and nothing random; the
caller brings the adverts and the measured round time. Correctness never depends on perfect
agreement: averaging is weighted by the tokens each peer actually trained.

How a plan is made (mode "negotiated"; "uniform" differs only in step 3):

1. Eligibility. An advert takes part when its run is this run, it is not paused or loading, its
   `start_round` <= round, its platform runs one of the run's allowed base precisions
   (`train.precisions`) and it trains in one of them, its `max_micro_batch` >= 1 (it fits its memory
   in that precision, swarm.precision.fit) and its effective speed (`throughput_tokens_per_s *
   max_utilization`) is at least `MIN_TOKENS_PER_S`. Every other advert is listed in `excluded`
   with a reason code and a one-line detail (a peer that fits no allowed option: `does_not_fit`,
   naming the least it needs, as it advertised). If a peer id appears twice, the advert with the
   newest timestamp counts (ties: the larger canonical JSON).
2. Budget. `S = max(1, round_half_up(tokens_per_round / seq_len))` whole sequences; if there are
   more eligible peers than that, `S = n` (every peer gets one sequence and the round exceeds its
   budget by the difference). `total_tokens = sum(quota_tokens)` is exactly `S * seq_len`.
3. Quotas, in whole sequences, proportional to effective speed (uniform mode: equal weights):
   peers whose exact share is below one sequence are pinned at one and the rest is re-split among
   the others until every share is >= 1; then the largest-remainder method: each peer gets the
   floor of its exact share and the leftover sequences go one each to the largest remainders,
   ties broken by peer id. Each quota is within one sequence of its (pinned) exact share.
4. Micro-batches. `micro_batch = min(train.micro_batch, advert.max_micro_batch, sequences)`,
   `accumulation_steps = ceil(sequences / micro_batch)`. Convention: every micro-batch is full
   except the last, which holds `sequences - (accumulation_steps - 1) * micro_batch` sequences
   (1..micro_batch); see `PeerTask.last_micro_batch`.
5. Time. `expected_seconds = quota_tokens / effective speed`;
   `predicted_seconds = max(expected_seconds)`;
   `deadline_seconds = max(predicted_seconds, previous_round_seconds or 0) * slack + margin_seconds`
   (defaults 1.5 and 2 s), at most `averaging.round_timeout`. `previous_round_seconds` is the measured compute time of the previous
   round, so the deadline adapts when the adverts are optimistic; it never shrinks below the
   prediction. A peer that has not finished by the deadline contributes what it has.

`plan_id` is a short hash of what peers must agree on: run, round, mode, seq_len and the tasks
(peer id, sequences, micro-batch, accumulation steps). It leaves out the speeds and the deadline:
the deadline depends on a locally measured time, and two peers that split the work the same way
agree, whatever the last digit of an advertised speed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from swarm.config import RunConfig
from swarm.precision import PRECISIONS
from swarm.records import CapabilityAdvert

Mode = Literal["negotiated", "uniform"]
ExclusionReason = Literal["wrong_run", "paused", "loading", "not_started", "no_precision", "precision_not_allowed",
                          "does_not_fit", "no_throughput"]

DEFAULT_SLACK = 1.5
DEFAULT_MARGIN_SECONDS = 2.0
#: Below this effective speed a peer would need absurd times for one sequence: it is excluded.
MIN_TOKENS_PER_S = 1e-3
GB = 1_000_000_000  # decimal gigabytes, as in "needs 3.2 GB, has 2.0 GB"


@dataclass(frozen=True)
class PeerTask:
    """One peer's share of a round."""

    peer_id: str
    quota_tokens: int  #: tokens to train this round, always sequences * seq_len
    sequences: int  #: whole sequences in the quota (>= 1)
    micro_batch: int  #: sequences per forward/backward (every micro-batch but the last is full)
    accumulation_steps: int  #: ceil(sequences / micro_batch)
    expected_seconds: float  #: quota_tokens / effective_tokens_per_s
    effective_tokens_per_s: float  #: throughput * max_utilization the plan assumed (for drift checks)

    @property
    def last_micro_batch(self) -> int:
        """Size of the final micro-batch (equal to micro_batch when sequences divide evenly)."""
        return self.sequences - (self.accumulation_steps - 1) * self.micro_batch

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "quota_tokens": self.quota_tokens,
            "sequences": self.sequences,
            "micro_batch": self.micro_batch,
            "accumulation_steps": self.accumulation_steps,
            "expected_seconds": self.expected_seconds,
            "effective_tokens_per_s": self.effective_tokens_per_s,
        }


@dataclass(frozen=True)
class Exclusion:
    """Why an advertised peer has no task this round."""

    peer_id: str
    reason: ExclusionReason  #: a stable code for scripts
    detail: str  #: one line for people

    def to_dict(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class RoundPlan:
    """Who trains how much in one round; identical on every peer that saw the same adverts.

    An empty plan (no eligible peer) is a valid plan: `tasks` is empty, `total_tokens` and the
    times are 0, and `reason` says why (it is None for a non-empty plan).
    """

    run: str
    round: int
    mode: Mode
    plan_id: str
    seq_len: int
    tasks: tuple[PeerTask, ...]  #: sorted by peer_id
    total_tokens: int
    predicted_seconds: float  #: max expected_seconds over tasks
    deadline_seconds: float
    excluded: tuple[Exclusion, ...]  #: sorted by peer_id
    reason: str | None = None

    @property
    def empty(self) -> bool:
        return not self.tasks

    @property
    def peer_ids(self) -> tuple[str, ...]:
        return tuple(t.peer_id for t in self.tasks)

    def task_for(self, peer_id: str) -> PeerTask | None:
        """This peer's task, or None when it has none (see `exclusion_for` for why)."""
        for t in self.tasks:
            if t.peer_id == peer_id:
                return t
        return None

    def exclusion_for(self, peer_id: str) -> Exclusion | None:
        for e in self.excluded:
            if e.peer_id == peer_id:
                return e
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (str/int/finite float/None/list/dict), for metrics.jsonl and swarm.status."""
        return {
            "run": self.run,
            "round": self.round,
            "mode": self.mode,
            "plan_id": self.plan_id,
            "seq_len": self.seq_len,
            "total_tokens": self.total_tokens,
            "predicted_seconds": self.predicted_seconds,
            "deadline_seconds": self.deadline_seconds,
            "tasks": [t.to_dict() for t in self.tasks],
            "excluded": [e.to_dict() for e in self.excluded],
            "reason": self.reason,
        }


# ---------------------------------------------------------------------------------------------
# eligibility


def _effective_speed(a: CapabilityAdvert) -> float:
    return a.throughput_tokens_per_s * a.max_utilization


def _precision_label(a: CapabilityAdvert) -> str:
    return a.precision + (" with gradient checkpointing" if a.checkpointing else "")


def _exclusion(a: CapabilityAdvert, run: str, round: int, allowed: tuple[str, ...]) -> Exclusion | None:
    if a.run != run:
        return Exclusion(a.peer_id, "wrong_run", f"advertises run {a.run!r}, not {run!r}")
    if a.paused:
        return Exclusion(a.peer_id, "paused", "paused by its owner")
    if a.loading:
        return Exclusion(a.peer_id, "loading", "still loading its model")
    if a.start_round > round:
        return Exclusion(a.peer_id, "not_started", f"starts at round {a.start_round}")
    if not set(a.precisions) & set(allowed):
        return Exclusion(a.peer_id, "no_precision", f"runs none of the base precisions the run allows "
                                                    f"({', '.join(allowed)}); its platform runs {', '.join(a.precisions) or 'none'}")
    if a.precision not in allowed:
        return Exclusion(a.peer_id, "precision_not_allowed", f"trains in {a.precision}, which the run does not allow "
                                                             f"({', '.join(allowed)})")
    if a.max_micro_batch < 1:
        if a.memory_needed_bytes:
            return Exclusion(a.peer_id, "does_not_fit", f"fits no allowed option: micro-batch 1 needs "
                                                        f"{a.memory_needed_bytes / GB:.2f} GB as {_precision_label(a)}, "
                                                        f"it has {a.memory_usable_bytes / GB:.2f} GB usable")
        return Exclusion(a.peer_id, "does_not_fit", f"micro-batch 1 does not fit its {a.memory_usable_bytes / GB:.1f} GB usable memory")
    speed = _effective_speed(a)
    if speed < MIN_TOKENS_PER_S:
        return Exclusion(
            a.peer_id,
            "no_throughput",
            f"effective speed {a.throughput_tokens_per_s:g} tokens/s x {a.max_utilization:g} is below {MIN_TOKENS_PER_S:g}",
        )
    return None


def _canonical(a: CapabilityAdvert) -> str:
    return json.dumps(a.to_wire(), sort_keys=True, separators=(",", ":"))


def _dedupe(adverts: Iterable[CapabilityAdvert]) -> list[CapabilityAdvert]:
    """One advert per peer id (newest timestamp, then larger canonical JSON), sorted by peer id."""
    best: dict[str, tuple[float, str, CapabilityAdvert]] = {}
    for a in adverts:
        key = (a.timestamp, _canonical(a))
        cur = best.get(a.peer_id)
        if cur is None or key > cur[:2]:
            best[a.peer_id] = (*key, a)
    return [best[pid][2] for pid in sorted(best)]


def _split(run: str, adverts: Iterable[CapabilityAdvert], round: int,
           allowed: tuple[str, ...]) -> tuple[list[CapabilityAdvert], list[Exclusion]]:
    eligible, excluded = [], []
    for a in _dedupe(adverts):
        e = _exclusion(a, run, round, allowed)
        if e is None:
            eligible.append(a)
        else:
            excluded.append(e)
    return eligible, excluded


# ---------------------------------------------------------------------------------------------
# arithmetic


def _budget_sequences(tokens_per_round: int, seq_len: int) -> int:
    """The round budget in whole sequences, rounded half up, at least 1."""
    return max(1, (2 * tokens_per_round + seq_len) // (2 * seq_len))


def _allocate(ids: list[str], weights: list[Fraction], total: int) -> list[int]:
    """Split `total` units among peers (sorted ids, positive exact weights), each >= 1.

    Requires total >= len(ids). Pins peers whose share is below one unit at one, re-splits the rest,
    then largest remainder with ties broken by peer id. Exact: Fractions are pairs of integers.
    """
    n = len(ids)
    assert n and total >= n and all(w > 0 for w in weights)
    pinned = [False] * n
    while True:
        free = [i for i in range(n) if not pinned[i]]
        rest = total - (n - len(free))
        if not free:
            break
        wsum = sum(weights[i] for i in free)
        low = [i for i in free if rest * weights[i] < wsum]
        if not low:
            break
        for i in low:
            pinned[i] = True
    out = [1] * n
    if free:
        shares = {i: rest * weights[i] / wsum for i in free}
        for i in free:
            out[i] = math.floor(shares[i])
        left = rest - sum(out[i] for i in free)
        by_remainder = sorted(free, key=lambda i: (-(shares[i] - out[i]), ids[i]))
        for i in by_remainder[:left]:
            out[i] += 1
    assert sum(out) == total and min(out) >= 1
    return out


def _plan_id(run: str, round: int, mode: str, seq_len: int, tasks: Iterable[PeerTask]) -> str:
    body = {
        "v": 1,
        "run": run,
        "round": round,
        "mode": mode,
        "seq_len": seq_len,
        "tasks": [[t.peer_id, t.sequences, t.micro_batch, t.accumulation_steps] for t in tasks],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def _empty_reason(excluded: list[Exclusion]) -> str:
    if not excluded:
        return "no eligible peers: no adverts"
    counts: dict[str, int] = {}
    for e in excluded:
        counts[e.reason] = counts.get(e.reason, 0) + 1
    parts = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(counts.items()))
    return f"no eligible peers ({len(excluded)} excluded; {parts})"


# ---------------------------------------------------------------------------------------------
# public API


def plan_round(
    run: RunConfig,
    adverts: Iterable[CapabilityAdvert],
    round: int,
    *,
    previous_round_seconds: float | None = None,
    mode: Mode = "negotiated",
    slack: float = DEFAULT_SLACK,
    margin_seconds: float = DEFAULT_MARGIN_SECONDS,
) -> RoundPlan:
    """The plan for `round` from the live adverts (see the module docstring for every formula).

    Pure and deterministic: any order of the same adverts gives the same plan. Never raises for
    what the adverts say (everyone excluded gives an empty plan with a `reason`); raises ValueError
    for a bad argument from the caller (negative round, unknown mode, slack < 1, ...).
    """
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    if mode not in ("negotiated", "uniform"):
        raise ValueError(f"mode must be 'negotiated' or 'uniform', got {mode!r}")
    if not (math.isfinite(slack) and slack >= 1.0):
        raise ValueError(f"slack must be a finite number >= 1, got {slack}")
    if not (math.isfinite(margin_seconds) and margin_seconds >= 0.0):
        raise ValueError(f"margin_seconds must be finite and >= 0, got {margin_seconds}")
    if previous_round_seconds is not None and not (math.isfinite(previous_round_seconds) and previous_round_seconds >= 0):
        raise ValueError(f"previous_round_seconds must be finite and >= 0, got {previous_round_seconds}")

    seq_len = run.train.seq_len
    eligible, excluded = _split(run.name, adverts, round, tuple(run.train.precisions))
    if not eligible:
        tasks: tuple[PeerTask, ...] = ()
        return RoundPlan(
            run=run.name,
            round=round,
            mode=mode,
            plan_id=_plan_id(run.name, round, mode, seq_len, tasks),
            seq_len=seq_len,
            tasks=tasks,
            total_tokens=0,
            predicted_seconds=0.0,
            deadline_seconds=0.0,
            excluded=tuple(excluded),
            reason=_empty_reason(excluded),
        )

    ids = [a.peer_id for a in eligible]
    if mode == "uniform":
        weights = [Fraction(1)] * len(eligible)
    else:
        weights = [Fraction(a.throughput_tokens_per_s) * Fraction(a.max_utilization) for a in eligible]
    total = max(_budget_sequences(run.train.tokens_per_round, seq_len), len(eligible))
    sequences = _allocate(ids, weights, total)

    built = []
    for a, seqs in zip(eligible, sequences):
        mb = min(run.train.micro_batch, a.max_micro_batch, seqs)
        speed = _effective_speed(a)
        quota = seqs * seq_len
        task = PeerTask(
            peer_id=a.peer_id,
            quota_tokens=quota,
            sequences=seqs,
            micro_batch=mb,
            accumulation_steps=-(-seqs // mb),
            expected_seconds=quota / speed,
            effective_tokens_per_s=speed,
        )
        built.append(task)
    tasks = tuple(built)
    predicted = max(t.expected_seconds for t in tasks)
    basis = max(predicted, previous_round_seconds or 0.0)
    return RoundPlan(
        run=run.name,
        round=round,
        mode=mode,
        plan_id=_plan_id(run.name, round, mode, seq_len, tasks),
        seq_len=seq_len,
        tasks=tasks,
        total_tokens=total * seq_len,
        predicted_seconds=predicted,
        # capped: one advert of a crawling speed (0.001 tokens/s) must not stall every round for days; a peer
        # that has not finished by then contributes what it trained
        deadline_seconds=min(basis * slack + margin_seconds, run.averaging.round_timeout),
        excluded=tuple(excluded),
        reason=None,
    )


SPEED_RATIO = 4.0  #: no peer's speed counts for more than this many times the (lower) median of its peers'


def clamp_speeds(speeds: Mapping[str, float], ratio: float = SPEED_RATIO) -> dict[str, float]:
    """Self-reported speeds (adverts, or the measurements members share in a round), each at most `ratio` x the
    lower median of all of them: one claim cannot take most of a round (security review, item 7). Pure and
    deterministic: every peer clamps the same numbers alike."""
    values = sorted(v for v in speeds.values() if v > 0)
    if len(values) < 2:
        return dict(speeds)
    cap = values[(len(values) - 1) // 2] * ratio
    return {p: min(v, cap) for p, v in speeds.items()}


def paced_adverts(adverts: list[CapabilityAdvert], speeds: Mapping[str, float]) -> list[CapabilityAdvert]:
    """The adverts a plan is made from: each peer's speed as its last group measured and shared it (`speeds`, the
    same numbers on every member) where known, its advert otherwise; all of them clamped (`clamp_speeds`)."""
    raw = {a.peer_id: speeds.get(a.peer_id, a.throughput_tokens_per_s) for a in adverts}
    capped = clamp_speeds(raw)
    return [a.model_copy(update={"throughput_tokens_per_s": capped[a.peer_id]})
            if capped[a.peer_id] != a.throughput_tokens_per_s else a for a in adverts]


def shared_pace(old: Mapping[str, float], shared: Mapping[str, float]) -> dict[str, float]:
    """The speeds a committed round hands on: each member's shared measurement, smoothed with the last one, at most
    doubling per round, then clamped. The same numbers on every member (all inputs are the group's)."""
    out = {}
    for p, s in sorted(shared.items()):
        out[p] = s if p not in old else min(0.5 * old[p] + 0.5 * s, 2.0 * old[p])
    return clamp_speeds(out)


def needs_replan(old_plan: RoundPlan, adverts: Iterable[CapabilityAdvert], round: int, drift: float = 0.25,
                 allowed: tuple[str, ...] = PRECISIONS) -> bool:
    """True when `old_plan` no longer describes the swarm at `round`.

    That is: the set of eligible peers changed (join, leave, advert expiry, pause, a peer that
    reached its start round or stopped fitting); or a planned peer's effective speed moved by more
    than `drift` relative to the speed the plan assumed (|new - old| / old > drift); or a planned
    micro-batch no longer fits (the peer's max_micro_batch fell below it). Pure, like plan_round.
    """
    if not (math.isfinite(drift) and drift >= 0):
        raise ValueError(f"drift must be finite and >= 0, got {drift}")
    eligible, _ = _split(old_plan.run, adverts, round, allowed)
    if tuple(a.peer_id for a in eligible) != old_plan.peer_ids:
        return True
    for a, t in zip(eligible, old_plan.tasks):
        if abs(_effective_speed(a) - t.effective_tokens_per_s) > drift * t.effective_tokens_per_s:
            return True
        if a.max_micro_batch < t.micro_batch:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# run discovery


@dataclass(frozen=True)
class RunOption:
    """A run a peer could join, with what it needs on this machine (computed by the memory model)."""

    name: str
    params: int  #: base model parameters (the "size" of the run)
    bytes_needed: int  #: memory needed to train micro-batch 1 of this run on this machine
    fits: bool | None = None  #: precomputed answer; None = bytes_needed <= usable_bytes

    @classmethod
    def coerce(cls, item: RunOption | Mapping[str, Any] | tuple) -> RunOption:
        """Accept a RunOption, a mapping with these keys (or `run_name`), or a tuple in field order."""
        if isinstance(item, RunOption):
            return item
        if isinstance(item, Mapping):
            name = item["name"] if "name" in item else item["run_name"]
            return cls(name, item["params"], item["bytes_needed"], item.get("fits"))
        if isinstance(item, tuple):
            return cls(*item)
        raise TypeError(f"not a run option: {item!r}")


@dataclass(frozen=True)
class RunChoice:
    """The run to join (None when none fits) and a one-line reason either way."""

    run: str | None
    reason: str


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1_000_000_000 else f"{n / 1e6:.1f}M"


def fit_reason(bytes_needed: int, usable_bytes: int) -> str:
    """The one line a peer prints about memory: 'needs X GB, has Y GB'."""
    return f"needs {bytes_needed / GB:.1f} GB, has {usable_bytes / GB:.1f} GB"


def choose_run(runs: Iterable[RunOption | Mapping[str, Any] | tuple], usable_bytes: int) -> RunChoice:
    """Pick the run with the largest model this machine can train (ties: smallest name).

    A run fits when its `fits` says so, or, when `fits` is None, when bytes_needed <= usable_bytes.
    When none fits, the reason names the run closest to fitting: "... needs X GB, has Y GB".
    """
    options = sorted((RunOption.coerce(r) for r in runs), key=lambda o: o.name)
    if not options:
        return RunChoice(None, "no runs found in the swarm")

    def fits(o: RunOption) -> bool:
        return o.fits if o.fits is not None else o.bytes_needed <= usable_bytes

    fitting = [o for o in options if fits(o)]
    if fitting:
        best = min(fitting, key=lambda o: (-o.params, o.name))
        return RunChoice(
            best.name,
            f"run {best.name!r} ({_fmt_params(best.params)} params) is the largest that fits "
            f"({len(fitting)} of {len(options)} runs fit): {fit_reason(best.bytes_needed, usable_bytes)}",
        )
    nearest = min(options, key=lambda o: (o.bytes_needed, o.name))
    return RunChoice(
        None,
        f"no run fits this machine; the smallest, {nearest.name!r}, {fit_reason(nearest.bytes_needed, usable_bytes)}",
    )
