"""A peer's steps, one method each, in the order `swarm.join.run_peer` calls them.

detect (create) -> connect -> initial_state -> start_advertising -> [plan -> train -> average ->
commit | roll_back] -> leave -> close. Getting the swarm's state (resume, download, catch up, agree)
is `swarm.sync.StateSync`, which Peer mixes in.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from swarm import PROTOCOL_VERSION, SwarmError
from swarm.adapters import save_mlx_adapter, save_peft_adapter
from swarm.agreement import commit_blocker, round_one_started_without, round_one_wait, trains_another_plan
from swarm.averaging import new_salt
from swarm.backends.base import TrainResult
from swarm.checkpoint import TrainingState
from swarm.codec import transport_refusal
from swarm.config import load_config
from swarm.datasets import local_data
from swarm.local_steps import LocalSteps, averaging_clip, shared_optimizer
from swarm.metrics import MetricsFile, Reporter
from swarm.planner import RoundPlan, paced_adverts, plan_round, shared_pace
from swarm.records import CapabilityAdvert, ProgressRecord, RunRecord
from swarm.round import Pacer, RoundOutcome, average_round
from swarm.runs import resolve_run
from swarm.settings import PeerSettings
from swarm.sync import POLL, StateSync
from swarm.transport.base import ABANDONED
from swarm.transport.factory import SAME

ADVERT_PERIOD = 5.0
SILENT = 3 * ADVERT_PERIOD  # a peer whose advert did not change for this long (by our own clock) stopped
AVERAGE_ATTEMPTS = 3     # all-reduce attempts per round with the same trained contribution
BAN_ROUNDS = 10          # a peer whose contribution was rejected sits out this many rounds (doubling on repeats)
LINGER = 20.0            # a peer that finished the run serves its final state this long to peers still behind
STARTER_WAIT = 120.0    # before round 1 of a new swarm, wait at most this long for visible peers still loading


def route_swarm_logs(log_file: Path) -> None:
    """Diagnostics of swarm's modules (dropped records...) go to a file; the console gets the Reporter's lines."""
    import logging

    lg = logging.getLogger("swarm")
    lg.propagate = False
    if not lg.handlers:
        from swarm.logs import log_handler  # rotated, and shared with hivemind's lines

        lg.addHandler(log_handler(log_file))
        lg.setLevel(logging.INFO)


class Peer(StateSync):
    # ------------------------------------------------------------------------------ detect
    @classmethod
    def create(cls, settings: PeerSettings) -> "Peer":
        from swarm.hardware import detect

        self = cls()
        self.settings = settings
        self.data = settings.data  # the peer's local copy of the run's dataset (swarm.datasets.local_data)
        self.config = load_config(str(settings.config)) if settings.config else None
        if self.config is not None and self.config.data.private:  # fail fast, before the network: it needs --data
            local_data(self.config, self.data, from_network=False)
        if self.config is not None and (why := transport_refusal(self.config.averaging.codec, settings.transport)):
            raise SwarmError(why)  # before the network (a run from the network: the transport's open_averaging says it)
        self.hw = detect(memory_limit_gb=settings.memory_limit)
        if settings.memory_limit is not None:  # memory is the constraint: make resident memory match the estimate
            from swarm.hardware import tune_allocator

            self.allocator = tune_allocator()
        from swarm.key import load as load_swarm_key

        self.swarm_key = load_swarm_key(settings.swarm_key) if settings.swarm_key else None
        self.out = settings.output
        self._lock_output()
        self.transport = None
        self.stop_advertising = threading.Event()
        self._state_lock = threading.Lock()
        self.state: TrainingState | None = None
        self.start_round = 0
        self.paused = False
        self.loading = True           # advertised as loading (connected, model not ready) until the model is loaded
        self.training_round, self.plan_id = 0, ""
        self.max_micro_batch = 0
        self.tokens_per_s = 0.0
        self.last_plan: RoundPlan | None = None
        self.history: dict[int, str] = {}  # recent rounds -> this peer's state hash (TrainingState.state_sha256)
        self.last_group: list[str] = []     # members of the last group this peer committed a round with
        self.last_speed = 0.0
        self.banned: dict[str, int] = {}    # peer -> last round it is excluded from (its contribution was rejected)
        self.plan_banned = False            # plan with the banned peers in (see `adverts`) until the bans end
        self.missing: dict[str, float] = {}  # peer planned in but absent from the last group -> its advert's timestamp then
        self.advert_seen: dict[str, float] = {}
        self.heard: dict[str, tuple[float, float]] = {}  # peer -> (its advert's timestamp, our monotonic time it changed)
        self.strikes: dict[str, int] = {}
        self.residual = None                # int8 codec: error feedback of the last committed round (swarm.codec)
        from swarm.precision import PrecisionSettings

        self.precision = PrecisionSettings()  # swarm.join sets the peer's own from --precision
        return self

    def _lock_output(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        from swarm.lifecycle import lock_output  # a POSIX lock: hivemind's forked processes never hold it

        self._lock_file = lock_output(self.out / ".lock")
        if self._lock_file is None:
            raise SwarmError(f"output directory {self.out} is in use by another peer: give this one its own --output") from None

    # ------------------------------------------------------------------------------ connect
    def connect(self) -> None:
        from swarm.membership import Membership
        from swarm.transport.factory import make_transport

        a = self.settings
        self.transport = make_transport(a.transport, host=a.host, port=a.port, initial_peers=a.initial_peers,
                                        announce=a.announce, output=self.out, swarm_key=self.swarm_key)
        route_swarm_logs(self.out / "network.log")
        self.me = self.transport.peer_id
        self.log = Reporter(self.me)
        if not a.initial_peers:
            print("initial peers: " + " ".join(self.transport.visible_maddrs()), flush=True)
        self.log.say(f"output: {self.out}")
        self.log.say(f"hardware: {self.hw.backend} ({self.hw.backend_reason.split(':')[0]}), {self.hw.device}, "
                     f"{self.hw.memory_usable_bytes / 1e9:.1f} of {self.hw.memory_total_bytes / 1e9:.1f} GB usable, tier {self.hw.tier}")
        if self.hw.unusable_gpu:
            self.log.warn(self.hw.unusable_gpu)  # trains on what is viable (the CPU) instead of failing mid-round
        self.members = Membership(self.transport)
        st = self.settings
        self.run, self.run_record = resolve_run(config=self.config, name=st.run, data=st.data, joining=bool(st.initial_peers),
                                                members=self.members, memory_bytes=self.hw.memory_usable_bytes,
                                                backend=self.hw.backend, precision=self.precision, say=self.log.say)
        self._resolve_base()
        self._check_run()
        self._advertise()  # "loading": a new swarm's first round waits for peers it can already see
        self._load_model()
        self.loading = False  # ready: plannable from the next advert on (catching up included)
        from swarm.averaging import vector_size

        self.transport.open_averaging(run=self.run.name, vector_size=vector_size(self.vector_size),
                                      matchmaking_time=self.run.averaging.matchmaking_time,
                                      allreduce_timeout=self.run.averaging.allreduce_timeout,
                                      chunk_timeout=self.run.averaging.chunk_timeout,
                                      clip_norm=averaging_clip(self.run.train, self.vector_size),
                                      max_norm_ratio=self.run.averaging.max_norm_ratio, codec=self.run.averaging.codec)
        self.transport.serve_state(self._serve_state)
        self.metrics = MetricsFile(self.out / "metrics.jsonl")

    def _resolve_base(self) -> None:
        """The base model directory and its hash: enough to check (or create) the run record."""
        import json

        from swarm.model import base_sha256, resolve_model_dir

        self.model_dir = resolve_model_dir(self.run.model)
        self.base_sha256 = base_sha256(self.model_dir)
        self.model_config_json = json.loads((self.model_dir / "config.json").read_text())
        self.fingerprint = self.run.fingerprint()

    def _load_model(self) -> None:
        from swarm.backends import load_backend
        from swarm.memory import ModelShape
        from swarm.precision import fit

        run = self.run
        shape = ModelShape.from_config(self.model_config_json)
        # this peer's own choice, from the run's allowed list and its own memory (the plan then uses its advert)
        f = fit(self.precision, run, shape, self.hw.memory_usable_bytes)
        self.precision, self.max_micro_batch, self.memory_needed = f.settings, f.max_micro_batch, f.needed_bytes
        if self.max_micro_batch < 1:  # a last advert: plans exclude it, saying why (swarm.status shows it) until it expires
            self.loading = False
            self._advertise()
            raise SwarmError(f"this machine cannot train run {run.name!r} ({shape.param_count() / 1e6:.0f}M params): "
                             f"{plan_round(run, [self._advert()], 1).exclusion_for(self.me).detail}")
        name = self.settings.backend if self.settings.backend != "auto" else ("mlx" if self.hw.backend == "mlx" else "torch")
        self.backend = load_backend(name, run=run, model_dir=self.model_dir, threads=self.settings.threads, seed=self.settings.seed,
                                    precision=self.precision)
        self.names = self.backend.adapter_names()
        adapter = self.backend.get_adapter()
        self.shapes = {n: tuple(adapter[n].shape) for n in self.names}
        self.vector_size = sum(int(np.prod(s)) for s in self.shapes.values())
        self.local = LocalSteps(run.train, self.names, self.shapes) if run.train.local_steps > 1 else None  # DiLoCo
        from swarm.datasets import load_run_data
        from swarm.evaluation import Evaluation

        data = load_run_data(run.data, self.model_dir, run.train.seq_len)  # the held-out split is never trained on
        self.windows, self.tokens = data.windows, data.tokens  # windows: a dataset (swarm.datasets); else raw text
        self.evaluation = Evaluation(data.held_out, run.data.eval_every, private=run.data.private)
        self.tokens_per_s = self._probe_throughput()
        self.log.say(f"run {run.name!r}: {shape.param_count() / 1e6:.1f}M-param base ({self.base_sha256[:12]}), "
                     f"{self.vector_size} LoRA params, backend {self.backend.name}, base {self.precision.precision} "
                     f"({self.precision.reason}), {self.tokens_per_s:.0f} tokens/s measured")

    def _probe_throughput(self) -> float:
        """Measured LoRA-step tokens/s on this run's model, cached per (model, backend, device, dtype, shape)."""
        from swarm.benchmark import ThroughputKey, cached_throughput, measure_throughput
        from swarm.data import sample_batches

        t = self.run.train
        mb = min(t.micro_batch, self.max_micro_batch)
        device = self.hw.backend + (f"-t{self.settings.threads}" if self.settings.threads else "")
        key = ThroughputKey(self.base_sha256, self.backend.name, device,
                            self.precision.dtype if self.precision.precision == "fp32" else self.precision.precision, mb, t.seq_len)
        batches = lambda: sample_batches(self.tokens, t.seq_len, mb, mb, self.settings.seed, 0, 1)  # noqa: E731
        value, _ = cached_throughput(key, lambda: measure_throughput(self.backend, batches, warmup=1, steps=2))
        return value

    def _check_run(self) -> None:
        """A peer whose base model, adapter config or protocol differs from the swarm's refuses to join."""
        from swarm.datasets import record_config  # a private run's record names no data path or hash

        rec = self.run_record
        if rec is None:
            self.run_record = RunRecord(name=self.run.name, protocol=PROTOCOL_VERSION, fingerprint=self.fingerprint,
                                        base_sha256=self.base_sha256, model=self._model_label(),
                                        params=int(sum(np.prod(s) for s in self._base_shapes())),
                                        config=record_config(self.run), model_config_json=self.model_config_json,
                                        created=self.transport.now(), transport=self.settings.transport)
            self.members.publish_run(self.run_record)
            return
        if rec.protocol != PROTOCOL_VERSION:
            raise SwarmError(f"run {rec.name!r} speaks swarm protocol {rec.protocol}, this peer speaks {PROTOCOL_VERSION}: "
                             "install the same swarm version as the other peers")
        if rec.transport != self.settings.transport:  # (a peer of the other transport rarely gets this far)
            raise SwarmError(f"run {rec.name!r} runs over --transport {rec.transport}, this peer over --transport "
                             f"{self.settings.transport}: {SAME}")
        if rec.base_sha256 != self.base_sha256:
            raise SwarmError(f"base model differs from the swarm's: run {rec.name!r} uses base {rec.base_sha256[:12]}, "
                             f"this peer has {self.base_sha256[:12]} ({self.model_dir})")
        if rec.fingerprint != self.fingerprint:
            raise SwarmError(f"run {rec.name!r} uses different LoRA/optimizer settings (config fingerprint "
                             f"{rec.fingerprint} vs this peer's {self.fingerprint}): use the run's config")

    def _model_label(self) -> str:
        return "builtin" if self.run.model.path is None else Path(self.run.model.path).name

    def _base_shapes(self):
        from safetensors import safe_open

        for f in sorted(self.model_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="np") as st:
                for k in st.keys():
                    yield st.get_slice(k).get_shape()

    # ------------------------------------------------------------------------------ advertise
    def _advert(self) -> CapabilityAdvert:
        return CapabilityAdvert(
            peer_id=self.me, run=self.run.name, backend=self.hw.backend, device=self.hw.device[:200], tier=self.hw.tier,
            memory_total_bytes=self.hw.memory_total_bytes, memory_usable_bytes=self.hw.memory_usable_bytes,
            throughput_tokens_per_s=float(self.tokens_per_s), max_utilization=self.settings.max_utilization,
            max_micro_batch=self.max_micro_batch, start_round=self.start_round, paused=self.paused,
            loading=self.loading, training_round=self.training_round, plan_id=self.plan_id,
            precision=self.precision.precision, precisions=list(self.precision.runnable()),
            checkpointing=self.precision.gradient_checkpointing, memory_needed_bytes=getattr(self, "memory_needed", 0),
            timestamp=self.transport.now())

    def _advertise(self) -> None:
        self.members.advertise(self._advert())

    def start_background_mode(self) -> None:
        """--background: lowest priority, and pause/resume with the owner's use of the machine."""
        if not self.settings.background:
            return
        from swarm.background import Monitor, lower_priority

        self.log.say(f"background mode: {lower_priority()}; pausing while other processes keep the CPU busy")

        def changed(paused: bool, load: float, on_battery) -> None:
            self.paused = paused
            why = "on battery" if on_battery else f"other processes use {load:.0%} of the CPU"
            self.log.say(("pausing: " if paused else "resuming: ") + why)
            try:
                self._advertise()
            except Exception:
                pass  # the advertiser thread retries

        self.monitor = Monitor(on_change=changed).start()

    def start_advertising(self) -> None:
        def loop():
            n = 0
            while not self.stop_advertising.wait(ADVERT_PERIOD if n else 0):
                try:
                    self._advertise()
                    if n % 6 == 0:
                        self.members.publish_run(self.run_record)
                except Exception as e:  # the next refresh retries; the loop must not die
                    self.log.warn(f"advert refresh failed: {e}")
                n += 1

        self._advertise()
        self._advertiser = threading.Thread(target=loop, name="advertiser", daemon=True)
        self._advertiser.start()

    # ------------------------------------------------------------------------------ plan
    def adverts(self, rnd: int | None = None) -> list[CapabilityAdvert]:
        """Live adverts of this run. For planning round `rnd`, left out: peers whose contribution was rejected
        (for a while), peers planned in but absent from the last group until they advertise again (a killed
        peer's advert outlives it by up to its TTL; the group must not wait for it), silent peers and peers two
        rounds behind.

        A ban is this peer's own verdict. Another member may not have reached it (it missed the records that
        named the cheat, or its all-reduce failed first), and two members planning from different sets while
        a ban lasts would never agree on a plan, so never average again. When a round fails while a planned
        peer advertises another plan for it (`_plans_differ`), the banned peers are planned in again until the
        bans end (`plan_banned`): still refused in matchmaking and not waited for, their share untrained."""
        mine = self._advert()
        adverts = self.members.adverts(self.run.name)
        behind = self._behind(rnd, adverts) if rnd is not None else set()
        out, silent = [], self._silent(adverts)
        for a in adverts:
            if a.peer_id == self.me or a.peer_id in behind or a.peer_id in silent \
                    or (rnd is not None and not self.plan_banned and self.banned.get(a.peer_id, 0) >= rnd):
                continue
            if a.peer_id in self.missing:
                if a.timestamp == self.missing[a.peer_id]:
                    continue
                del self.missing[a.peer_id]  # it advertised since: alive
            out.append(a)
        self.advert_seen = {a.peer_id: a.timestamp for a in out}
        return out + [mine]

    def _plans_differ(self, rnd: int) -> bool:
        """Does a peer of this round's plan advertise training round `rnd` with another plan id?"""
        plan = self.last_plan
        return plan is not None and plan.round == rnd and trains_another_plan(
            self.members.adverts(self.run.name), me=self.me, rnd=rnd, plan_id=plan.plan_id, planned=plan.peer_ids)

    def note_absent(self, plan: RoundPlan, outcome: RoundOutcome, rnd: int) -> None:
        """Planned members the group went on without: left out of plans until their next advert."""
        for peer in set(plan.peer_ids) - set(outcome.members) - set(self.banned) - {self.me}:
            if peer in self.advert_seen and peer not in self.missing:
                self.missing[peer] = self.advert_seen[peer]
                self.log.say(f"peer {peer} was planned in but did not join the group: planning without it "
                             "until it advertises again", rnd)

    def _gone(self, rnd: int) -> dict[str, str]:
        """Peers that will not take part in round `rnd` after all, by their own word since the plan was
        made: leaving, pausing, catching up to join at a later round, or silent (killed, asleep, offline). Peer -> why."""
        adverts = self.members.adverts(self.run.name)
        gone = {p: f"it stopped advertising {t:.0f}s ago" for p, t in self._silent(adverts).items()}
        gone.update({a.peer_id: "it paused" if a.paused else f"it joins at round {a.start_round}"
                     for a in adverts if a.paused or a.start_round > rnd})
        gone.update({p.peer_id: "it is leaving" for p in self.members.progress(self.run.name) if p.state == "leaving"})
        gone.pop(self.me, None)
        return gone

    def _silent(self, adverts: list[CapabilityAdvert]) -> dict[str, float]:
        """Peers whose advert has not been refreshed for SILENT seconds, timed by this peer's own clock
        (peers' clocks may disagree), with the seconds since it last changed. A killed peer's advert
        lingers in the DHT until its TTL; nobody should wait for it."""
        now = time.monotonic()
        out = {}
        for a in adverts:
            ts, since = self.heard.get(a.peer_id, (None, now))
            if ts != a.timestamp:
                self.heard[a.peer_id] = (a.timestamp, now)
            elif a.peer_id != self.me and now - since > SILENT:
                out[a.peer_id] = now - since
        return out

    def _behind(self, rnd: int, adverts: list[CapabilityAdvert]) -> set[str]:
        """Of `adverts`, peers still working on a round at least two before `rnd` (by their progress and start
        round): they cannot be in round `rnd`'s group and will catch up (announcing a new start round) first."""
        done = {p.peer_id: p.round for p in self.members.progress(self.run.name)}
        return {a.peer_id for a in adverts
                if a.peer_id != self.me and max(done.get(a.peer_id, 0), a.start_round - 1) < rnd - 2}

    def exclude(self, offenders: dict[str, str], rnd: int) -> None:
        """Members whose contribution the group rejected sit out: refused in matchmaking, not waited for, left out
        of plans (see `adverts`)."""
        for peer, why in offenders.items():
            if peer == self.me:
                self.log.warn(f"the group rejected this peer's contribution: {why}", rnd)
                continue
            self.strikes[peer] = self.strikes.get(peer, 0) + 1
            self.banned[peer] = rnd + BAN_ROUNDS * 2 ** (self.strikes[peer] - 1) - 1
            self.log.warn(f"rejected the contribution of peer {peer}: {why}; going on without it "
                          f"(excluded through round {self.banned[peer]})", rnd)
        self.transport.ban({p for p, last in self.banned.items() if last >= rnd})

    def verify_run(self) -> None:
        """The run record this peer joined with is pinned: a record read later (another fingerprint, an older
        self-declared `created`: anyone can write one) never replaces it and never stops a running peer; it is
        reported once, and this peer keeps publishing its own."""
        rec = self.members.runs().get(self.run.name)
        if rec is not None and rec != self.run_record and rec != getattr(self, "_foreign_run", None):
            self._foreign_run = rec
            self.log.warn(f"ignoring another record of run {rec.name!r} in the DHT (fingerprint {rec.fingerprint[:12]}, "
                          f"created {rec.created:.0f}): this peer keeps the run it joined")

    def plan(self, rnd: int, stop) -> RoundPlan | None:
        if self.paused:
            from swarm.background import wait_while

            wait_while(lambda: self.paused, stop)
            if not stop() and self._swarm_round() >= rnd:
                self.catch_up(stop, "resuming after a pause")
            return None
        self.verify_run()
        fork = self.losing_fork()
        if fork is not None:  # another chain of rounds outweighs ours: its state, then go on from there
            self.history.clear()
            self.sync_to_fork(stop, fork)
            return None
        bad = self.disagreement() if self.history else None
        if bad is not None:
            self.history.clear()
            self.catch_up(stop, f"this peer's adapter after round {bad} differs from the swarm's")
            return None
        adverts = self.adverts(rnd)
        if self.banned and any(last < rnd for last in self.banned.values()):
            self.banned = {p: last for p, last in self.banned.items() if last >= rnd}
            self.transport.ban(set(self.banned))
        self.plan_banned = self.plan_banned and bool(self.banned)
        if rnd == 1 and self.state.round == 0 and self._wait_before_round_one(adverts):
            time.sleep(POLL)
            return None
        mode = "uniform" if self.settings.uniform else "negotiated"
        # speeds every member of the last group measured and shared in its all-reduce: the same numbers on every
        # member (and on a joiner, which downloaded them with the state), fresher than adverts
        adverts = paced_adverts(adverts, self.state.speeds)  # clamped: one claim cannot take the round
        plan = plan_round(self.run, adverts, rnd, previous_round_seconds=self.state.round_seconds, mode=mode)
        if plan.task_for(self.me) is None:
            ex = plan.exclusion_for(self.me)
            if ex is not None and ex.reason == "does_not_fit":
                raise SwarmError(f"this machine cannot train run {self.run.name!r}: {ex.detail}")
            time.sleep(POLL)
            return None
        if rnd == 1 and self.state.round == 0 and round_one_started_without(adverts, me=self.me, plan_id=plan.plan_id,
                                                                             planned=plan.peer_ids):
            # round 1 is under way with a plan this peer is not part of: training it anyway could commit a second
            # round 1 (a fork); join the swarm after it instead
            self.catch_up(stop, "round 1 of this swarm started without this peer")
            return None
        self.training_round, self.plan_id = rnd, plan.plan_id  # the advertiser thread carries it from now on
        if rnd == 1:
            try:
                self._advertise()  # at once: peers still deciding whether round 1 started without them read this
            except Exception:
                pass  # the advertiser thread retries
        self.last_plan = plan
        self.round_started = time.monotonic()
        self.round_started_swarm = self.transport.now()
        return plan

    def _wait_before_round_one(self, adverts: list[CapabilityAdvert]) -> bool:
        """Before round 1 of a new swarm: wait for --min-peers and for visible peers still loading (agreement)."""
        first = self._waiting_since = getattr(self, "_waiting_since", None) or time.monotonic()
        wait, ready, loading = round_one_wait(adverts, me=self.me, min_peers=self.settings.min_peers,
                                              waited=time.monotonic() - first, max_wait=STARTER_WAIT)
        if wait and getattr(self, "_said_waiting", None) != (ready, loading):
            self._said_waiting = (ready, loading)
            want = f"{self.settings.min_peers} peers" if ready < self.settings.min_peers else "them"
            self.log.say(f"waiting before round 1: {ready} peer(s) ready, {loading} still loading; waiting for {want}")
        return wait

    # ------------------------------------------------------------------------------ train
    def train(self, plan: RoundPlan, rnd: int, stop) -> TrainResult:
        from swarm.data import peer_key, sample_batches

        task = plan.task_for(self.me)
        self.eval_part = self.evaluation.part(self.backend, plan, self.me, rnd, self.log)  # round rnd-1's adapter
        if self.windows is not None:
            from swarm.datasets import shard_batches  # the round's peers train disjoint windows

            # one permutation per round for the whole run (not each peer's --seed), so the shards never overlap
            batches = shard_batches(self.windows, plan, self.me, int(self.fingerprint, 16), rnd)
        else:
            batches = sample_batches(self.tokens, self.run.train.seq_len, task.sequences, task.micro_batch,
                                     self.settings.seed, rnd, peer_key(self.me))
        self.pacer = Pacer(batches, deadline=self.round_started + plan.deadline_seconds,
                           max_utilization=self.settings.max_utilization, stop=lambda: stop() or self.paused)
        result = self.local.train(self.backend, self.pacer, task.accumulation_steps, rnd, self.state.adapter) \
            if self.local else self.backend.train(self.pacer)
        compute = result.seconds - self.pacer.slept
        self.last_speed = result.tokens / compute if result.tokens and compute > 0 else 0.0
        if self.last_speed:
            self.tokens_per_s = 0.5 * self.tokens_per_s + 0.5 * self.last_speed if self.tokens_per_s else self.last_speed
        return result

    # ------------------------------------------------------------------------------ average
    def average(self, plan: RoundPlan, train: TrainResult, rnd: int) -> RoundOutcome:
        """Average this round's contribution; if the all-reduce fails, retry it at once with the same
        contribution (the group's other members failed at the same moment and retry too), unless the
        swarm has already completed the round without us."""
        if os.environ.get("SWARM_CHAOS_DIE_IN_ROUND") == str(rnd):  # fault injection for tests and scripts/chaos.py
            self._die_soon(in_reduction=os.environ.get("SWARM_CHAOS_DIE_AT") == "reduce")
        mm = self.run.averaging.matchmaking_time
        wait_until = self.round_started_swarm + plan.deadline_seconds + 0.5  # stragglers contribute what they have by then
        outcome, gone, failures, absent = None, {}, 0, set()
        salt = new_salt()  # one per round: every attempt announces and sends the same contribution
        for attempt in range(AVERAGE_ATTEMPTS + len(plan.tasks)):  # abandoned attempts drop a member each time
            timeout = max(wait_until - self.transport.now(), 0.0) + 2 * mm + 5.0
            if attempt:  # a planned member may have left since, or dropped out of the last attempt: don't wait for it
                gone = self._gone(rnd)
            group = [t.peer_id for t in plan.tasks if t.peer_id == self.me or (
                     self.banned.get(t.peer_id, 0) < rnd and t.peer_id not in gone and t.peer_id not in absent)]

            def abandon(group=group) -> str | None:  # a member we wait for says it won't come: stop waiting
                if self._swarm_round() >= rnd:  # its group committed the round without this peer: catch up, not wait
                    return f"the swarm completed round {rnd} without this peer"
                left = {p: why for p, why in self._gone(rnd).items() if p in group}
                return "; ".join(f"peer {p} will not be in this round: {why}" for p, why in sorted(left.items())) or None

            outcome = average_round(self.transport, train, names=self.names, shapes=self.shapes, round_=rnd,
                                    plan_id=plan.plan_id, group_size=len(group),
                                    clip_norm=averaging_clip(self.run.train, self.vector_size), timeout=timeout, run=self.run.name,
                                    wait_until=wait_until, speed=self.last_speed,
                                    quotas={t.peer_id: t.quota_tokens for t in plan.tasks},
                                    max_tokens=self.run.train.tokens_per_round, abandon=abandon,
                                    lineage=self.state.lineage, salt=salt, extra={"eval": self.eval_part},
                                    codec=self.run.averaging.codec, residual=self.residual)
            if outcome.offenders:
                self.exclude(outcome.offenders, rnd)
            absent |= set(outcome.absent) - {self.me}
            if outcome.ok:
                minority = self._minority(plan, outcome, rnd)
                if minority:
                    outcome = RoundOutcome(ok=False, reason=minority, contribution_checksum=outcome.contribution_checksum)
            if outcome.ok:
                self.note_absent(plan, outcome, rnd)
                break
            if outcome.reason.startswith("not contributing") or self._swarm_round() >= rnd:
                break
            if outcome.reason.startswith(ABANDONED):  # members still training may take until the plan's deadline
                why = outcome.reason[len(ABANDONED):]
                self.log.say(why + ("; going on without them" if "; peer " in why else "; going on without it"), rnd)
                wait_until = max(wait_until, self.transport.now() + 2 * mm)
                continue
            failures += 1
            if failures == AVERAGE_ATTEMPTS:
                break
            self.log.warn(("retrying without it" if set(outcome.offenders) - {self.me} else
                           f"averaging failed ({outcome.reason}); retrying") + " with the same contribution", rnd)
            wait_until = self.transport.now() + 2 * mm
        return outcome

    def _minority(self, plan: RoundPlan, outcome: RoundOutcome, rnd: int) -> str | None:
        """Why this group may not commit round `rnd` (a strict majority of who could be in it), or None."""
        def blocker(gone):
            return commit_blocker(me=self.me, planned=plan.peer_ids, last_group=self.last_group, group=outcome.members,
                                  gone=gone, banned=self.banned, rnd=rnd)

        # the DHT is asked who left only when the group is not a majority of everyone
        return blocker(()) and blocker(self._gone(rnd))

    def _die_soon(self, in_reduction: bool) -> None:
        """Fault injection: SIGKILL this peer's process group (its p2pd too) as it enters averaging, or once its
        group has formed and the reduction runs (SWARM_CHAOS_DIE_AT=reduce; bounded: 60 s). SWARM_CHAOS_KILL=main
        kills the main process only: its helpers must then go by themselves (swarm.lifecycle)."""
        import signal

        def die():
            end = time.monotonic() + 60
            while in_reduction and not self.transport.reducing() and time.monotonic() < end:
                time.sleep(0.002)
            if os.environ.get("SWARM_CHAOS_KILL") == "main":
                os.kill(os.getpid(), signal.SIGKILL)
            os.killpg(os.getpgrp(), signal.SIGKILL)

        threading.Timer(0.05, die).start()

    # ------------------------------------------------------------------------------ commit
    def commit(self, outcome: RoundOutcome, rnd: int) -> TrainingState:
        momentum = self.local.commit(self.backend, self.state.adapter, outcome.mean_grads, self.state.momentum) \
            if self.local else self.backend.apply_update(outcome.mean_grads)  # local steps: the outer step (DiLoCo)
        self.last_group = list(outcome.members)
        self.residual = outcome.residual  # int8 codec: what this peer still owes the sum, kept only with the round
        # the same update on every member, from the same shared numbers: they plan the next round alike
        speeds = shared_pace(self.state.speeds, outcome.speeds)
        state = self._hold(self.state.successor(round_=rnd, adapter=self.backend.get_adapter(),
                                                optimizer=shared_optimizer() if self.local else self.backend.get_optimizer(),
                                                momentum=momentum, update_sha256=outcome.update_sha256,
                                                tokens=outcome.group_tokens, speeds=speeds,
                                                round_seconds=outcome.slowest_seconds or None))
        self.save_outputs(state)
        return state

    def save_outputs(self, state: TrainingState) -> None:
        """The adapter in both layouts (peft, mlx-lm), each replaced atomically."""
        save_peft_adapter(self.out / "adapter", state.adapter, self.run, self.model_dir)
        save_mlx_adapter(self.out / "mlx_adapter", state.adapter, self.run)

    def publish(self, state: TrainingState, plan: RoundPlan, train: TrainResult, outcome: RoundOutcome) -> None:
        seconds = time.monotonic() - self.round_started
        task = plan.task_for(self.me)
        loss = train.loss_sum / train.tokens if train.tokens else None
        tps = train.tokens / seconds if seconds > 0 else 0.0
        digest = state.adapter_sha256
        self.history[state.round] = state.state_sha256  # the whole state is voted on (swarm.sync.confirmed)
        for old in sorted(self.history)[:-8]:
            del self.history[old]
        self.metrics.write({
            "round": state.round, "peer": self.me, "loss": loss, "group_loss": outcome.group_loss, "tokens": train.tokens,
            "group_tokens": outcome.group_tokens, "group_size": outcome.group_size, "seconds": round(seconds, 4),
            "train_seconds": round(train.seconds, 4), "idle_seconds": round(self.pacer.slept, 4),
            "wait_seconds": round(outcome.reduce_seconds, 4),
            "barrier_wait_seconds": round(outcome.barrier_wait, 4),
            "compute_seconds": round(max(0.0, train.seconds - self.pacer.slept), 4), "bytes_sent": outcome.bytes_sent,
            "comm_seconds": round(max(0.0, outcome.reduce_seconds - outcome.barrier_wait), 4), "bytes_received": outcome.bytes_received,
            "tokens_per_s": round(tps, 2), "backend": self.backend.name, "precision": self.precision.precision,
            "checkpointing": self.precision.gradient_checkpointing, "adapter_sha256": digest,
            "adapter_norm": float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in state.adapter.values()))),
            "plan_id": plan.plan_id, "plan_round": plan.round, "plan_mode": plan.mode, "quota_tokens": task.quota_tokens,
            "micro_batch": task.micro_batch, "accumulation_steps": task.accumulation_steps,
            "deadline_seconds": round(plan.deadline_seconds, 3), "cut_short": self.pacer.cut_short, "time": time.time(),
            "members": outcome.members, "grad_norm": outcome.grad_norm, "contribution_checksum": outcome.contribution_checksum,
            "sum_checksum": outcome.sum_checksum, "excluded": sorted(p for p, last in self.banned.items() if last >= state.round),
            "lineage": state.lineage, "work": state.work, "data_private": self.run.data.private, **self.take_lost_work(),
            **self.evaluation.row(outcome, plan, state.round, self.log),
        })
        self.members.report(self.run.name, ProgressRecord(
            peer_id=self.me, round=state.round, adapter_sha256=digest, loss=loss, tokens_per_s=tps,
            quota_tokens=task.quota_tokens, micro_batch=task.micro_batch, plan_id=plan.plan_id,
            backend=self.backend.name, history={str(r): h for r, h in self.history.items()},
            **self.chain_fields(state), timestamp=self.transport.now()))
        self.log.say(f"loss {loss if loss is not None else float('nan'):.4f} | {train.tokens} tok, {tps:.0f} tok/s | "
                     f"group {outcome.group_size} ({outcome.group_tokens} tok) | wait {outcome.reduce_seconds:.2f}s | "
                     f"adapter {digest[:12]}", state.round)

    # ------------------------------------------------------------------------------ roll back
    def roll_back(self, outcome: RoundOutcome, rnd: int, stop) -> TrainingState:
        """The round failed here: nothing was applied. Retry it, or catch up if the swarm went on without us."""
        self.log.warn(f"round not applied: {outcome.reason}", rnd)
        if self.local:
            self.local.restore(self.backend, self.state.adapter)
        if self.banned and not self.plan_banned and self._plans_differ(rnd):
            self.plan_banned = True
            self.log.warn("a planned peer trains this round with another plan (it has not banned whom this peer "
                          "did): planning with the banned peers in, as it does, until the bans end; they are still "
                          "refused", rnd)
        until = time.monotonic() + self.run.averaging.matchmaking_time
        while time.monotonic() < until and not stop():
            if self._swarm_round() >= rnd:
                return self.catch_up(stop, "the swarm completed this round without us")
            time.sleep(POLL)
        return self.state

    # ------------------------------------------------------------------------------ leave
    def leave(self, state: TrainingState, finished: bool = False) -> None:
        """Say goodbye in the DHT. After the last round, keep serving the final state a little while
        to peers still behind (a straggler that missed the last rounds can then still end identical)."""
        if finished:
            end = time.monotonic() + LINGER
            while time.monotonic() < end:
                progress = {p.peer_id: p for p in self.members.progress(self.run.name)}
                behind = [a for a in self.members.adverts(self.run.name)  # includes joiners with no round yet
                          if a.peer_id != self.me and not a.paused and (
                              a.peer_id not in progress or (progress[a.peer_id].state != "leaving"
                                                            and progress[a.peer_id].round < state.round))]
                if not behind:
                    break
                time.sleep(0.5)
        self.paused = True
        try:
            self._advertise()
            self.members.report(self.run.name, ProgressRecord(
                peer_id=self.me, round=state.round, adapter_sha256=state.adapter_sha256, state="leaving",
                history={str(r): h for r, h in self.history.items()},
                **self.chain_fields(state), timestamp=self.transport.now()))
        except Exception:
            pass
        self.log.say(f"left after round {state.round} (adapter {state.adapter_sha256[:12]}); output in {self.out}")

    def close(self) -> None:
        self.stop_advertising.set()
        if getattr(self, "monitor", None) is not None:
            self.monitor.stop()
        if self.transport is not None:
            self.transport.shutdown()
        from swarm.lifecycle import unlock_output

        unlock_output(getattr(self, "_lock_file", None))
