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

What this does not catch (not yet): a reducer that hands every member the same wrong span. That
needs a check of the values, e.g. a random linear sketch whose seed is fixed only after these
hashes are published (each member then publishes its own contribution's sketch, and the sum of
those must equal the sketch of the result), or redundant reducers.
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


def span_hashes(result: np.ndarray, spans: dict[str, tuple[int, int]], group_size: int) -> dict[str, str]:
    """Reducer -> hash of the span it reduced, as exact integer sums (what `averaging.decode` reads: the raw
    averages differ in their last bits from member to member, their rounded sums do not)."""
    vec = np.ascontiguousarray(np.rint(np.asarray(result, dtype=np.float64) * group_size))
    return {p: hashlib.sha256(vec[a:b].tobytes()).hexdigest()[:32] for p, (a, b) in sorted(spans.items())
            if 0 <= a <= b <= len(vec)}


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
                    spans: dict[str, tuple[int, int]], leader: str | None, wait: float, attempt: str = "",
                    clock=time.monotonic, sleep=time.sleep) -> tuple[str | None, dict[str, str]]:
    """(why not to commit, offenders) after exchanging signed result hashes with the group; (None, {}) to commit.

    `attempt` names this very group (`attempt_id`): the same members retrying a round form a new group whose
    result differs, and a member's record of the last attempt, still in the DHT, must not be read as its report
    of this one (one member would then refuse a result the others commit)."""
    me = transport.peer_id
    group = sorted(members)
    mine = {"update": digest, "parts": span_hashes(result, spans, len(group)), "members": group, "attempt": attempt}
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
            return None, {}
        if clock() >= end and reads >= 2:  # one slow DHT read, begun before the others stored theirs, is not enough
            break
        sleep(POLL)
    if 2 * (len(seen) + 1) > len(group):  # a majority (this peer included) confirmed the same result
        return None, {}
    missing = sorted(set(others) - set(seen))
    return (f"only {len(seen) + 1} of {len(group)} members confirmed the result (missing: {', '.join(missing)}; "
            f"{reads} reads in {clock() - start:.1f}s)"), {}
