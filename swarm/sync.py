"""Getting and keeping the swarm's state: resume, download, catch up, agree, serve.

A mixin of `swarm.peer.Peer` (it uses the peer's transport, membership, backend and run): the
rules for never training on stale state live here, apart from the round loop.
"""

from __future__ import annotations

import time
from collections import Counter

from swarm import SwarmError, checkpoint
from swarm.adapters import initial_adapter
from swarm.backends.base import OptimizerState
from swarm.checkpoint import StateError, TrainingState

POLL = 0.2


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
                state = TrainingState(round=0, adapter=initial_adapter(self.shapes, self.args.seed),
                                      optimizer=OptimizerState(step=0), fingerprint=self.fingerprint)
            self.start_round = state.round + 1
            return self._set_state(state)
        self._set_state(local or TrainingState(round=0, adapter=self.backend.get_adapter(), optimizer=OptimizerState(step=0),
                                               fingerprint=self.fingerprint))
        return self.catch_up(stop, f"the swarm is at round {swarm_round}")

    def _swarm_round(self) -> int:
        # leaving peers count too: their round was reached, so state older than it is stale
        return max((p.round for p in self.members.progress(self.run.name) if p.peer_id != self.me), default=0)

    def catch_up(self, stop, why: str) -> TrainingState:
        """Announce the round we will join at, wait for the swarm to reach it, download and verify its state."""
        target = self._swarm_round() + 1                 # the state we need: after the round now in progress
        if self.args.max_rounds is not None:
            target = min(target, self.args.max_rounds)   # the swarm ends there: take its final state
        self.start_round = target + 1
        self._advertise()
        self.log.say(f"{why}: joining at round {self.start_round}, downloading state after round {target}")
        backoff, deadline = 0.5, time.monotonic() + max(120.0, 4 * self.run.averaging.round_timeout)
        stale: set[str] = set()  # sources that served state older than the target: ask the others first
        while not stop() and time.monotonic() < deadline:
            if self._swarm_round() < target:
                time.sleep(POLL)
                continue
            got = self.transport.download_state(timeout=10.0, min_round=target, skip=stale)
            if got is None:
                if not stale:
                    self.log.warn(f"no peer could serve its state yet; retrying in {backoff:.1f}s")
                stale.clear()  # they may have moved on since
            else:
                meta, arrays, source = got
                try:
                    state = TrainingState.from_wire(meta, arrays, self.shapes, self.fingerprint, source=f"peer {source}")
                except StateError as e:
                    self.log.warn(f"rejected downloaded state: {e}; not downloading from it again")
                    self.transport.distrust(source)
                else:
                    confirmed = self.confirmed(state.round, state.adapter_sha256) if state.round >= target else False
                    if state.round < target:
                        stale.add(source)
                    if confirmed:
                        self.start_round = state.round + 1
                        self._advertise()
                        self.log.say(f"downloaded state of round {state.round} (adapter {state.adapter_sha256[:12]})")
                        self._set_state(state)
                        self.save_outputs(state)  # --output holds the swarm's state even if this peer leaves now
                        checkpoint.save(self.out / "checkpoint", state)
                        return state
                    if confirmed is None:
                        self.log.warn(f"rejected state of round {state.round} from peer {source}: adapter "
                                      f"{state.adapter_sha256[:12]} is not what the swarm's peers report; "
                                      "not downloading from it again")
                        self.transport.distrust(source)
            time.sleep(backoff)
            backoff = min(backoff * 2, 8.0)
        if stop():
            return self.state
        raise SwarmError("could not get the swarm's state: no live peer served a verified copy in time")

    def confirmed(self, rnd: int, digest: str) -> bool | None:
        """Is `digest` the swarm's adapter after round `rnd`, by the word of the peers that have passed it?
        True: more than half of them (of one framework) report it, or none has (nothing to compare with);
        False: reports are split (retry: they lag a commit by a moment); None: a majority reports another
        hash (reject it, and its source)."""
        by_backend: dict[str, list[str | None]] = {}
        for p in self.members.progress(self.run.name):
            if p.peer_id != self.me and p.state != "leaving" and p.round >= rnd and self.banned.get(p.peer_id, 0) < rnd:
                said = p.history.get(str(rnd)) or (p.adapter_sha256 if p.round == rnd else None)
                by_backend.setdefault(p.backend, []).append(said)
        if not by_backend:
            return True
        contradicted = False
        for said in by_backend.values():
            if 2 * said.count(digest) > len(said):
                return True
            contradicted |= any(2 * said.count(h) > len(said) for h in set(said) if h and h != digest)
        return None if contradicted else False

    def disagreement(self) -> int | None:
        """The latest recent round where this peer's adapter is not the swarm's (majority; ties: smallest hash).

        Only peers of the same framework vote: torch and MLX peers agree within float tolerance, not bit for bit.
        """
        votes: dict[int, Counter] = {}
        for p in self.members.progress(self.run.name):
            if p.peer_id != self.me and p.state != "leaving" and p.backend == self.backend.name:
                for r, h in p.history.items():
                    votes.setdefault(int(r), Counter())[h] += 1
        for r in sorted(self.history, reverse=True):
            if r in votes:
                c = votes[r] + Counter({self.history[r]: 1})
                winner = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
                if winner != self.history[r]:
                    return r
        return None

