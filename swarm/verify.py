"""Members check that they all received the same reduced result before anyone commits it.

Why: in the butterfly all-reduce each member reduces one span of the vector and sends the averaged
span back to every other member; nothing stops a hostile reducer from sending each member a
different span (every member would then commit a different adapter: a silent fork), and the checks
in `swarm.averaging.decode` only test what a reducer can satisfy by itself. So after decoding, each
member publishes, under its own signed DHT record, the hash of the update it decoded and a hash per
reducer span of the raw result, and commits only when every member that answered (at least a strict
majority of the group, itself included) reports the same update. When two members' hashes differ,
the spans that differ name the reducer that handed out different results; a member that reports a
different update with equal spans lies about its own result (named too).

A reducer that hands every member the same wrong span passes the hash comparison, so each member
also checks the values: with every record it publishes a random linear sketch, per reducer span, of
its own contribution (the exact integers it sent), and the sketches of all members' contributions
must add up to the sketch of the result (modulo a prime: exact, whatever the sizes). The sketch's
coefficients are drawn from a seed that is a hash of the result itself, so a reducer cannot choose
a change that the sketch misses: any change moves the seed, and a change passes one row with
probability 1/p (p = 2^31 - 1, two rows). A span whose sums disagree names its reducer, as above.
Limits, said plainly: a member could publish a false sketch of its own contribution and so frame
the reducer of that span (it would be refused for the ban's length; nothing tampered is committed
either way), and a reducer colluding with a sender can pass that sender's unchecked part as if the
sender had sent it (the sender's sketch absorbs the change). Redundant reducers would close both.
Every member must publish its record: a result not confirmed by all of them is not committed.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from swarm.transport.base import Transport

log = logging.getLogger(__name__)

POLL = 0.1
RESULT_TTL = 60.0
SKETCH_PRIME = (1 << 31) - 1  # x mod p times a coefficient < p fits int64; sums of < 2^32 such products do too
SKETCH_ROWS = 2
SKETCH_CHUNK = 1 << 20        # coefficients are drawn chunk by chunk (bounded memory, the same stream everywhere)


def span_hashes(result: np.ndarray, spans: dict[str, tuple[int, int]], group_size: int) -> dict[str, str]:
    """Reducer -> hash of the span it reduced, as exact integer sums (what `averaging.decode` reads: the raw
    averages differ in their last bits from member to member, their rounded sums do not)."""
    vec = integers(result, group_size)
    return {p: hashlib.sha256(vec[a:b].tobytes()).hexdigest()[:32] for p, (a, b) in sorted(spans.items())
            if 0 <= a <= b <= len(vec)}


def integers(result: np.ndarray, group_size: int) -> np.ndarray:
    """The exact integer sums a raw averaged vector stands for (what `averaging.decode` reads)."""
    return np.ascontiguousarray(np.rint(np.asarray(result, dtype=np.float64) * group_size))


def sketch_seed(parts: dict[str, str], attempt: str) -> int:
    """The sketch's randomness: a hash of the result (its span hashes), known only once the reducers sent it."""
    text = repr((attempt, sorted(parts.items())))
    return int.from_bytes(hashlib.sha256(b"swarm-sketch|" + text.encode()).digest()[:16], "big")


def sketch(values: np.ndarray, spans: dict[str, tuple[int, int]], seed: int) -> dict[str, list[int]]:
    """Reducer -> SKETCH_ROWS random linear combinations mod SKETCH_PRIME of `values` (exact integers in float64)
    over the span it reduced (pure; linear: the sketches of a sum are the sums of the sketches, mod p)."""
    vec = np.asarray(values, dtype=np.float64)
    rng = np.random.Generator(np.random.PCG64(seed))
    order = sorted((a, b, p) for p, (a, b) in spans.items() if 0 <= a <= b <= len(vec))
    acc = {p: [0] * SKETCH_ROWS for _, _, p in order}
    for lo in range(0, len(vec), SKETCH_CHUNK):
        hi = min(lo + SKETCH_CHUNK, len(vec))
        coef = rng.integers(0, SKETCH_PRIME, size=(SKETCH_ROWS, hi - lo), dtype=np.int64)
        x = np.rint(vec[lo:hi]).astype(np.int64) % SKETCH_PRIME
        prod = (coef * x) % SKETCH_PRIME
        for a, b, p in order:
            a2, b2 = max(a, lo), min(b, hi)
            if a2 < b2:
                sums = prod[:, a2 - lo:b2 - lo].sum(axis=1)
                acc[p] = [(acc[p][r] + int(sums[r])) % SKETCH_PRIME for r in range(SKETCH_ROWS)]
    return acc


def check_sketches(result_sketch: dict[str, list[int]], contributions: list[dict]) -> list[str]:
    """The reducers whose span of the result is not the sum of the members' contributions (pure)."""
    bad = []
    for p, want in sorted(result_sketch.items()):
        got = [0] * SKETCH_ROWS
        for c in contributions:
            rows = c.get(p) if isinstance(c, dict) else None
            if not (isinstance(rows, list) and len(rows) == SKETCH_ROWS and all(type(v) is int for v in rows)):
                bad.append(p)
                break
            got = [(g + v) % SKETCH_PRIME for g, v in zip(got, rows)]
        else:
            if got != want:
                bad.append(p)
    return bad


def attempt_id(gathered: dict) -> str:
    """One group formation, the same on every member: each member's signed announcement carries the time it
    entered this attempt."""
    marks = sorted((str(p), repr(g.get("arrived")) if isinstance(g, dict) else "") for p, g in gathered.items())
    return hashlib.sha256(repr(marks).encode()).hexdigest()[:16]


def compare(mine: dict, theirs: dict, *, me: str, peer: str) -> tuple[str, dict[str, str]] | None:
    """Why two members' reports of one result disagree, and who is to blame (pure); None if they agree."""
    if theirs.get("update") == mine["update"]:
        return None
    a, b = mine.get("parts", {}), theirs.get("parts", {})
    differ = sorted(p for p in a if p in b and a[p] != b[p])
    if differ:
        why = "handed members different results for the span it reduced"
        # one other reducer's span differs: it is to blame. Several, or this peer's own (which it sent alike to
        # everyone): ambiguous, nobody is excluded for it (a false accusation must not split honest peers)
        blame = {differ[0]: why} if len(differ) == 1 and differ[0] != me else {}
        return (f"reducer(s) {', '.join(differ)} {why} (peer {peer} and this peer decoded different updates)", blame)
    why = "reported another result than the one every reducer sent (its hashes of the reduced spans match ours)"
    return f"peer {peer} {why}", {}


def agree_on_result(transport: Transport, *, key: str, members: list[str], digest: str, result: np.ndarray,
                    contribution: np.ndarray, spans: dict[str, tuple[int, int]], leader: str | None, wait: float,
                    attempt: str = "", clock=time.monotonic, sleep=time.sleep) -> tuple[str | None, dict[str, str]]:
    """(why not to commit, offenders) after exchanging signed result hashes and contribution sketches with the
    group; (None, {}) to commit. `contribution`: the exact integer vector this peer sent.

    `attempt` names this very group (`attempt_id`): the same members retrying a round form a new group whose
    result differs, and a member's record of the last attempt, still in the DHT, must not be read as its report
    of this one (one member would then refuse a result the others commit)."""
    me = transport.peer_id
    group = sorted(members)
    parts = span_hashes(result, spans, len(group))
    seed = sketch_seed(parts, attempt)
    mine = {"update": digest, "parts": parts, "members": group, "attempt": attempt,
            "sketch": sketch(contribution, spans, seed)}
    transport.put(key, mine, RESULT_TTL)
    others = [m for m in group if m != me]
    seen: dict[str, dict] = {}
    start = clock()
    end, reads = start + wait, 0
    while True:
        reads += 1
        for rec in transport.get(key):
            v = rec.value
            if rec.owner in others and isinstance(v, dict) and v.get("members") == group and v.get("attempt", "") == attempt \
                    and isinstance(v.get("update"), str) and isinstance(v.get("parts"), dict):
                seen[rec.owner] = v
        for peer, theirs in sorted(seen.items()):
            bad = compare(mine, theirs, me=me, peer=peer)
            if bad:
                why, offenders = bad
                log.warning("not committing: %s (group leader %s)", why, leader)
                return f"the group's results differ: {why}", offenders
        if len(seen) == len(others):
            return _check_values(mine, seen, result, spans, len(group), seed, me=me, leader=leader)
        if clock() >= end and reads >= 2:  # one slow DHT read, begun before the others stored theirs, is not enough
            break
        sleep(POLL)
    # without every member's sketch the values cannot be checked: a reducer could withhold its own record
    missing = sorted(set(others) - set(seen))
    return (f"only {len(seen) + 1} of {len(group)} members confirmed the result (missing: {', '.join(missing)}; "
            f"{reads} reads in {clock() - start:.1f}s)"), {}


def _check_values(mine: dict, seen: dict[str, dict], result: np.ndarray, spans: dict[str, tuple[int, int]],
                  group_size: int, seed: int, *, me: str, leader: str | None) -> tuple[str | None, dict[str, str]]:
    """Every member reported the same hashes: check that the result's values are the sum of what they sent."""
    bad = check_sketches(sketch(integers(result, group_size), spans, seed),
                         [mine["sketch"]] + [seen[p].get("sketch") for p in sorted(seen)])
    if not bad:
        return None, {}
    why = "handed every member a result that is not the sum of the members' contributions"
    # one other reducer's span: it is to blame (or a member framed it with a false sketch: see the module docstring)
    blame = {bad[0]: why} if len(bad) == 1 and bad[0] != me else {}
    log.warning("not committing: reducer(s) %s %s (group leader %s)", ", ".join(bad), why, leader)
    return f"the group's result fails its value check: reducer(s) {', '.join(bad)} {why}", blame
