"""Getting and keeping the swarm's state: resume, download, catch up, agree, serve.

A mixin of `swarm.peer.Peer` (it uses the peer's transport, membership, backend and run): the
rules for never training on stale state live here, apart from the round loop.

Forks (the rules are in `swarm.agreement`): every peer reports (round, lineage, work, recent lineages)
in its progress record; two records are on different chains when their lineages differ at a round
both report. A peer whose chain is outweighed by a live one stops, downloads the survivor's state
(verified: it descends from the survivor's head and a peer of that chain reports it), logs the rounds
and tokens it lost and writes them in its next metrics row (`lost_rounds`, `lost_tokens`).
"""

from __future__ import annotations

import time
from collections import Counter

from swarm import SwarmError, checkpoint
from swarm.adapters import initial_adapter
from swarm.backends.base import OptimizerState
from swarm.checkpoint import StateError, TrainingState
from swarm.agreement import chain_of, heavier, lost_work, relation
from swarm.records import ProgressRecord

POLL = 0.2
FORK_SYNC_TIMEOUT = 90.0   # how long a peer on a losing fork tries to get the survivor's state
FORK_IGNORE = 120.0        # a survivor whose state could not be had is not chased again for this long
ELECTORATE_ROUNDS = 8      # votes on state count only members of this peer's groups of its last this many rounds


class StateSync:
    def _serve_state(self):
        with self._state_lock:
            if self.state is None:
                return None, []
            return self.state.to_wire()

    def _set_state(self, state: TrainingState) -> TrainingState:
        self.backend.set_adapter(state.adapter)
        self.backend.set_optimizer(state.optimizer)
        return self._hold(state)

    def _hold(self, state: TrainingState) -> TrainingState:
        """`state` is what this peer serves from now on (joiners ask the newest state first)."""
        with self._state_lock:
            self.state = state
        if state.speeds:  # the group that committed it (its signed members, inside the lineage): future voters
            groups = self.__dict__.setdefault("groups", {})
            groups[state.round] = frozenset(state.speeds)
            for old in sorted(groups)[:-ELECTORATE_ROUNDS]:
                del groups[old]
        self.transport.announce_state_round(state.round)
        return state

    def initial_state(self, stop) -> TrainingState:
        """Resume from this peer's checkpoint, start fresh, or download the swarm's current state."""
        local = checkpoint.load(self.out / "checkpoint", self.shapes, self.fingerprint)
        swarm_round = self._swarm_round()
        if swarm_round == 0 or (local is not None and local.round >= swarm_round):
            if local is not None:
                self.log.say(f"resuming from checkpoint (round {local.round}, adapter {local.adapter_sha256[:12]})")
                state = local
            else:
                state = TrainingState(round=0, adapter=initial_adapter(self.shapes, self.settings.seed),
                                      optimizer=OptimizerState(step=0), fingerprint=self.fingerprint)
            self.start_round = state.round + 1
            return self._set_state(state)
        self._set_state(local or TrainingState(round=0, adapter=self.backend.get_adapter(), optimizer=OptimizerState(step=0),
                                               fingerprint=self.fingerprint))
        return self.catch_up(stop, f"the swarm is at round {swarm_round}")

    def _swarm_round(self) -> int:
        # leaving peers count too: their round was reached, so state older than it is stale; peers on another
        # chain (a fork this peer's chain outweighs) do not: their rounds are not this swarm's
        mine = self.my_chain()
        return max((p.round for p in self.members.progress(self.run.name)
                    if p.peer_id != self.me and relation(chain_of(p), mine) is not False), default=0)

    # --- forks -----------------------------------------------------------------------------------
    def my_chain(self) -> dict[int, str]:
        state = self.state
        return {r: lin for r, (lin, _) in state.ancestry.items()} if state is not None else {}

    def chain_fields(self, state: TrainingState) -> dict:
        """What a progress record says of this peer's chain: lineage, work and the last 8 rounds' lineages."""
        recent = sorted(state.ancestry)[-8:]
        return {"lineage": state.lineage, "work": state.work,
                "lineages": {str(r): state.ancestry[r][0] for r in recent}}

    def take_lost_work(self) -> dict:
        lost, self._lost = getattr(self, "_lost", None) or {"lost_rounds": 0, "lost_tokens": 0}, None
        return lost

    def _plausible(self, p: ProgressRecord) -> bool:
        """A record's work cannot exceed what its rounds could have trained (a claim beyond is not a chain)."""
        from swarm.averaging import MAX_GROUP_SIZE

        t = self.run.train
        return p.work <= p.round * max(t.tokens_per_round + t.seq_len * MAX_GROUP_SIZE, 1)

    def losing_fork(self) -> ProgressRecord | None:
        """The head of a live chain that outweighs this peer's (see the module docstring), or None."""
        if self.state is None:
            return None
        mine = self.my_chain()
        adverts = self.members.adverts(self.run.name)
        live = {a.peer_id for a in adverts} - set(self._silent(adverts))
        ignored = {k: t for k, t in getattr(self, "_fork_ignored", {}).items() if t > time.monotonic()}
        self._fork_ignored = ignored
        head = (self.state.work, self.state.lineage)
        rivals = []
        for p in self.members.progress(self.run.name):
            if p.peer_id == self.me or not p.lineage or not self._plausible(p) or self.banned.get(p.peer_id, 0) >= p.round:
                continue
            rel = relation(chain_of(p), mine)
            if rel is True:
                head = (p.work, p.lineage) if heavier((p.work, p.lineage), head) else head
            elif rel is False and p.state != "leaving" and p.peer_id in live and p.lineage not in ignored:
                rivals.append(p)
        best = min(rivals, key=lambda p: (-p.work, p.lineage), default=None)
        return best if best is not None and heavier((best.work, best.lineage), head) else None

    def sync_to_fork(self, stop, winner: ProgressRecord) -> TrainingState:
        """Replace this peer's state with the surviving chain's; report the work this peer's chain lost."""
        old = self.state
        self.log.warn(f"this peer's chain (round {old.round}, work {old.work} tokens, lineage {old.lineage[:12]}) "
                      f"forked from a heavier one (peer {winner.peer_id}: round {winner.round}, work {winner.work} tokens, "
                      f"lineage {winner.lineage[:12]}): switching to it", old.round + 1)
        self.start_round = winner.round + 1
        self.training_round, self.plan_id = 0, ""
        self._advertise()
        stale: set[str] = set()
        end = time.monotonic() + FORK_SYNC_TIMEOUT
        backoff = 0.5
        while not stop() and time.monotonic() < end:
            got = self._fetch_state(winner.round, stale)
            if got is not None:
                state, source = got
                if state is None:
                    continue
                on_chain = state.ancestry.get(winner.round, ("",))[0] == winner.lineage
                vouched = any(p.peer_id != self.me and chain_of(p).get(state.round) == state.lineage
                              for p in self.members.progress(self.run.name))
                if on_chain and vouched:
                    self._adopt(state, f"downloaded state of round {state.round} (adapter {state.adapter_sha256[:12]}) "
                                       "from the surviving chain", announced=True)
                    return state
                stale.add(source)  # the losing chain's state, or not yet vouched for: ask the others first
            else:
                stale.clear()
            time.sleep(backoff)
            backoff = min(2 * backoff, 4.0)
        self._fork_ignored[winner.lineage] = time.monotonic() + FORK_IGNORE
        self.start_round = old.round + 1
        self._advertise()
        if not stop():
            self.log.warn(f"could not get the state of peer {winner.peer_id}'s chain in {FORK_SYNC_TIMEOUT:.0f}s: "
                          "going on with this peer's own")
        return old

    def _fetch_state(self, min_round: int, skip: set[str]) -> tuple[TrainingState | None, str] | None:
        """Download and validate state of round `min_round` or later from a peer not in `skip`: None when no peer
        served any, (None, source) when what `source` served was unusable (it is never asked again)."""
        got = self.transport.download_state(timeout=10.0, min_round=min_round, skip=skip)
        if got is None:
            return None
        meta, arrays, source = got
        try:
            return TrainingState.from_wire(meta, arrays, self.shapes, self.fingerprint, source=f"peer {source}"), source
        except StateError as e:
            self.log.warn(f"rejected downloaded state: {e}; not downloading from it again")
            self.transport.distrust(source)
            return None, source

    def _adopt(self, state: TrainingState, what: str, announced: bool = False) -> None:
        """Make `state` this peer's. If it does not descend from the state held so far (this peer's chain lost, however
        it found out: a fork seen, a round committed without it, a disagreement), the rounds and tokens lost are
        logged and go in the next metrics row. `announced`: the fork was already logged."""
        old = self.state
        self.start_round = state.round + 1
        self.training_round, self.plan_id = 0, ""
        self._advertise()
        self.log.say(what)
        # the peers that report this round are the group that committed it: the next round needs a majority of them
        self.last_group = [p.peer_id for p in self.members.progress(self.run.name)
                           if p.peer_id != self.me and chain_of(p).get(state.round) == state.lineage]
        self._set_state(state)
        lost = self._lost_to(old, state)
        if lost is not None:
            if not announced:
                self.log.warn(f"this peer's chain (round {old.round}, work {old.work} tokens, lineage {old.lineage[:12]}) "
                              f"forked from a heavier one (round {state.round}, work {state.work} tokens, lineage "
                              f"{state.lineage[:12]}): switched to it", state.round)
            self._lost = lost
            self.log.warn(f"lost {lost['lost_rounds']} round(s) ({lost['lost_tokens']} tokens) "
                          "of the chain this peer was on", state.round)
        self.save_outputs(state)  # --output holds the swarm's state even if this peer leaves now
        checkpoint.save(self.out / "checkpoint", state)

    @staticmethod
    def _lost_to(old: TrainingState | None, new: TrainingState) -> dict | None:
        """The work of `old`'s chain that `new` does not carry, or None when `new` descends from `old` (or when
        `new` remembers too few rounds to tell, or `old` is the fresh round-0 state)."""
        if old is None or old.round == 0 or not new.ancestry or min(new.ancestry) > min(old.round, new.round):
            return None
        if new.ancestry.get(old.round, ("",))[0] == old.lineage:
            return None
        lost = lost_work(old, new)
        return lost if lost["lost_rounds"] > 0 else None

    def catch_up(self, stop, why: str) -> TrainingState:
        """Announce the round we will join at, wait for the swarm to reach it, download and verify its state."""
        target = self._swarm_round() + 1                 # the state we need: after the round now in progress
        if self.settings.max_rounds is not None:
            target = min(target, self.settings.max_rounds)   # the swarm ends there: take its final state
        self.start_round = target + 1
        self._advertise()
        self.log.say(f"{why}: joining at round {self.start_round}, downloading state after round {target}")
        backoff, deadline = 0.5, time.monotonic() + max(120.0, 4 * self.run.averaging.round_timeout)
        stale: set[str] = set()  # sources that served state older than the target: ask the others first
        while not stop() and time.monotonic() < deadline:
            if self._swarm_round() < target:
                time.sleep(POLL)
                continue
            got = self._fetch_state(target, stale)
            if got is None:
                if not stale:
                    self.log.warn(f"no peer could serve its state yet; retrying in {backoff:.1f}s")
                stale.clear()  # they may have moved on since
            else:
                state, source = got
                if state is not None:
                    confirmed = self.confirmed(state.round, state.state_sha256, state.lineage,
                                               group=set(state.speeds)) if state.round >= target else False
                    if state.round < target:
                        stale.add(source)
                    if confirmed:
                        self._adopt(state, f"downloaded state of round {state.round} (adapter {state.adapter_sha256[:12]})")
                        return state
                    if confirmed is None:
                        self.log.warn(f"rejected state of round {state.round} from peer {source}: state "
                                      f"{state.state_sha256[:12]} (adapter {state.adapter_sha256[:12]}, lineage "
                                      f"{state.lineage[:12]}) is not what the "
                                      "swarm's peers report; "
                                      "not downloading from it again")
                        self.transport.distrust(source)
            time.sleep(backoff)
            backoff = min(backoff * 2, 8.0)
        if stop():
            return self.state
        raise SwarmError("could not get the swarm's state: no live peer served a verified copy in time")

    def electorate(self) -> set[str]:
        """Peers whose word counts in votes on state: the members of this peer's recent groups (signed
        announcements; see `_hold`). Empty for a peer that has been in no group yet (a joiner)."""
        return set().union(*getattr(self, "groups", {}).values()) - {getattr(self, "me", None)}

    def confirmed(self, rnd: int, digest: str, lineage: str | None = None, group: set[str] | None = None) -> bool | None:
        """Is `digest` the swarm's state (`TrainingState.state_sha256`: adapter, optimizer, lineage) after round
        `rnd`, by the word of the peers that have passed it?
        True: more than half of them (of one framework) report it; False: reports are split, or nobody reports
        round `rnd` at all (retry: they lag a commit by a moment; an unvouched round is never adopted); None: a
        majority reports another hash (reject it, and its source). `lineage` (the state's, which covers its pace and work): more than
        half of the peers of any framework that report a lineage for round `rnd` must report this one.
        Who votes (Sybils: identities are free): a peer that has been in groups counts only their members
        (`electorate`); a joiner counts everyone, and a state must also be vouched for by a majority of `group`,
        the members of the round that committed it, as that state names them."""
        by_backend: dict[str, list[str | None]] = {}
        lineages: list[str] = []
        electorate = self.electorate()
        passed = [p for p in self.members.progress(self.run.name)
                  if p.peer_id != self.me and p.round >= rnd and self.banned.get(p.peer_id, 0) < rnd
                  and (not electorate or p.peer_id in electorate)]
        # peers still training vote; when none has passed `rnd`, peers that left after it (a finished run's final state)
        voters = [p for p in passed if p.state != "leaving"] or passed
        for p in voters:
            said = p.history.get(str(rnd))
            by_backend.setdefault(p.backend, []).append(said)
            reported = chain_of(p).get(rnd)
            if reported:
                lineages.append(reported)
        if lineage is not None and lineages and 2 * lineages.count(lineage) <= len(lineages):
            return None if any(2 * lineages.count(h) > len(lineages) for h in set(lineages)) else False
        if not by_backend:  # no vote: wait. State claiming a round nobody vouches for (a far-future one) is never adopted
            return False
        if not electorate and group:  # a joiner: the committing group's members (as the state names them) vouch too
            vouching = sum(1 for p in voters if p.peer_id in group and p.history.get(str(rnd)) == digest)
            if 2 * vouching <= len(group):
                return False
        contradicted = False
        for said in by_backend.values():
            if 2 * said.count(digest) > len(said):
                return True
            contradicted |= any(2 * said.count(h) > len(said) for h in set(said) if h and h != digest)
        return None if contradicted else False

    def disagreement(self) -> int | None:
        """The latest recent round where this peer's state is not the swarm's (majority; ties: smallest hash).

        Only peers of the same framework vote: torch and MLX peers agree within float tolerance, not bit for bit.
        And only for rounds where they report this peer's lineage: a peer on another chain is a fork, which
        `losing_fork` settles by work, not by a head count.
        """
        votes: dict[int, Counter] = {}
        mine = self.my_chain()
        electorate = self.electorate()  # Sybils: only members of this peer's recent groups vote
        for p in self.members.progress(self.run.name):
            if p.peer_id != self.me and p.state != "leaving" and p.backend == self.backend.name \
                    and (not electorate or p.peer_id in electorate):
                theirs = chain_of(p)
                for r, h in p.history.items():
                    if not theirs or theirs.get(int(r)) == mine.get(int(r)):
                        votes.setdefault(int(r), Counter())[h] += 1
        for r in sorted(self.history, reverse=True):
            if r in votes:
                c = votes[r] + Counter({self.history[r]: 1})
                winner = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
                if winner != self.history[r]:
                    return r
        return None


