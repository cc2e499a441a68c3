"""Rules that keep every peer's round N the same state: pure functions, no I/O.

Why they are needed: peers plan from what they see in the DHT, and two peers' views differ for a
moment whenever someone joins, leaves or a network partition heals. Without rules, two groups with
different views could each commit "round N" (a fork), and a user reading `adapter/` would see one
of two adapters. Three rules, each computable by every peer from what it sees:

1. **Same start state.** A round's group key and each member's signed announcement carry the state's
   lineage (`checkpoint` docstring), so members only ever sum contributions made from one state.
2. **Majority commit** (`commit_blocker`). A group commits a round only when it holds a strict
   majority of the peers that could be in it: its plan, the live members of the last group this peer
   committed with, and the group itself; members rejected for cause do not count. If each of two
   disjoint groups counts the other among those peers (views that differ by a moment still do), at most
   one of them is a majority. A peer alone commits only when nobody else could be in the round.
3. **One surviving chain** (`heavier`, `relation`). If two chains exist anyway (a partition that
   heals, two swarms bridged by a peer that knows both), the one whose live head has the most work
   (tokens trained since round 0) survives, ties going to the smaller lineage hash. The yielding side
   stops growing its chain before it syncs and the survivor's work only grows, so two chains never
   yield to each other.

Plus the start of a swarm (`round_one_wait`, `round_one_started_without`): round 1 waits for peers
already connected but still loading their model, and a peer that finds round 1 under way with a plan
it is not part of joins after it instead of training a round 1 of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from swarm.checkpoint import TrainingState
    from swarm.records import CapabilityAdvert, ProgressRecord


def commit_blocker(*, me: str, planned: Iterable[str], last_group: Iterable[str], group: Iterable[str],
                   gone: Iterable[str], banned: dict[str, int], rnd: int) -> str | None:
    """Why a group may not commit round `rnd` (rule 2), or None when it may."""
    members = set(group) | {me}
    last = set(last_group) - set(gone)
    voters = {p for p in set(planned) | last if banned.get(p, 0) < rnd} | members
    if 2 * len(members) > len(voters):
        return None
    return (f"group of {len(members)} is not a majority of the {len(voters)} peers that could be in this round: "
            "not committing it")


def round_one_wait(adverts: list["CapabilityAdvert"], *, me: str, min_peers: int, waited: float,
                   max_wait: float) -> tuple[bool, int, int]:
    """Should a new swarm's round 1 wait? (wait, peers ready, peers still loading). It waits for --min-peers
    ready peers, and for visible peers still loading their model (at most `max_wait` s), never once another
    peer already trains round 1."""
    others = [a for a in adverts if a.peer_id != me and not a.paused]
    ready = sum(1 for a in adverts if not a.paused and not a.loading and a.start_round <= 1 and a.max_micro_batch >= 1)
    loading = sum(1 for a in others if a.loading)
    if any(a.training_round >= 1 for a in others if not a.loading):
        return False, ready, loading
    if ready >= min_peers and (not loading or waited > max_wait):
        return False, ready, loading
    return True, ready, loading


def trains_another_plan(adverts: list["CapabilityAdvert"], *, me: str, rnd: int, plan_id: str,
                        planned: Iterable[str] | None = None) -> bool:
    """Does a peer of this peer's plan (`planned`; None: any peer) advertise training round `rnd` with another plan
    id? Only planned peers count: one outside the plan (paused, not fitting, an outsider naming a plan of its own)
    can be in no group this plan forms."""
    members = None if planned is None else set(planned)
    return any(a.training_round == rnd and a.plan_id and a.plan_id != plan_id for a in adverts
               if a.peer_id != me and (members is None or a.peer_id in members))


def round_one_started_without(adverts: list["CapabilityAdvert"], *, me: str, plan_id: str,
                              planned: Iterable[str] | None = None) -> bool:
    """Is round 1 under way with a plan other than this peer's (so this peer may not be in it)? Counting an outsider
    here kept a new swarm waiting for a round 1 that nobody trained."""
    return trains_another_plan(adverts, me=me, rnd=1, plan_id=plan_id, planned=planned)


def relation(a: dict[int, str], b: dict[int, str]) -> bool | None:
    """Are two chains, given as round -> lineage for the rounds each reports, the same (True), forked (False),
    or is there no round both report (None)? Judged at the latest round both report."""
    common = set(a) & set(b)
    if not common:
        return None
    r = max(common)
    return a[r] == b[r]


def heavier(a: tuple[int, str], b: tuple[int, str]) -> bool:
    """Does chain head a = (work, lineage) survive over b (rule 3)? More work; equal work: the smaller hash."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def chain_of(p: "ProgressRecord") -> dict[int, str]:
    """Round -> lineage, for the rounds a progress record reports."""
    out = {int(r): h for r, h in p.lineages.items()}
    if p.lineage:
        out[p.round] = p.lineage
    return out


def lost_work(old: "TrainingState", new: "TrainingState") -> dict:
    """Rounds and tokens of `old`'s chain that are not on `new`'s: since the last round both chains share."""
    a, b = old.ancestry, new.ancestry
    shared = [r for r in a if r in b and a[r][0] == b[r][0]]
    if shared:
        fork = max(shared)
        return {"lost_rounds": max(old.round - fork, 0), "lost_tokens": max(old.work - a[fork][1], 0)}
    return {"lost_rounds": old.round, "lost_tokens": old.work}  # split before what both remember (256 rounds)
