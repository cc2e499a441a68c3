"""A hostile peer for tests and chaos runs (127.0.0.1 only), built from swarm's own internals: it trains honestly, then corrupts what it sends.

usage: python scripts/hostile_peer.py MODE [python -m swarm.join arguments]

  nan      every gradient value of its contribution is NaN (check lanes and token count left honest)
  huge     its gradient is scaled a millionfold after it announced its norm: integers still
  shape    every part it sends a reducer is one value short (its own vector, and so its schema, is right)
  outlier  its gradient is 100x larger and it says so (within a loose clip bound: out of line with the group)
  tokens   it claims 100x the tokens it trained, with a gradient encoded to match (to outweigh the others)
  state    it trains honestly, but serves joiners a poisoned adapter (self-consistent hash), at top priority
  lure     it trains honestly, and publishes a copy of its run record named `lure`, one parameter larger
           (so a joiner without --config would pick it), whose data.source and model.path name a local
           file ($SWARM_LURE_PATH): a joiner must never open it
  oldrun   it trains honestly, and keeps writing an older record (created 0) of the same run with another fingerprint
  speed    it trains honestly, but advertises and shares a speed of 1e9-1 tokens/s (to take ~96 % of every round)
  outsider it is in nobody's plan (its advert says paused) but joins every round's group with a plan of its own
  sybil    it trains honestly, and writes progress records of 6 fresh identities that report another state hash
           for every recent round (on the swarm's chain), to outvote the honest peers
  optstate it trains honestly, but serves joiners the swarm's adapter with poisoned optimizer moments (x 0.5,
           which pass every invariant) and a consistent hash, at top priority
  slowstate it trains honestly, but serves state one small message every 8 s (a stream that never ends in
           time), at top priority
  reducer  it trains honestly, but as a reducer it hands one member a different averaged span than the others
  future   it trains honestly, but serves joiners the swarm's state relabelled as round 1000000 (a far-future round
           nobody vouches for), at top priority
  samewrong it trains honestly, but as a reducer it hands every member (itself included) the same wrong averaged
           span: one fixed-point unit more in one data lane (every hash agrees; only a check of values sees it)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

MODES = ("nan", "huge", "shape", "outlier", "tokens", "state", "lure", "oldrun", "speed", "outsider", "sybil", "optstate",
         "slowstate", "reducer", "samewrong", "future")
if len(sys.argv) < 2 or sys.argv[1] not in MODES:
    sys.exit(f"usage: python scripts/hostile_peer.py {{{','.join(MODES)}}} --host 127.0.0.1 [swarm.join arguments]")
MODE = sys.argv.pop(1)
if "--host" not in sys.argv or not sys.argv[sys.argv.index("--host") + 1:][:1] == ["127.0.0.1"]:
    sys.exit("hostile_peer: refusing to run anywhere but --host 127.0.0.1 (it attacks the swarm it joins)")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import swarm.round as round_module  # noqa: E402
from swarm.averaging import CHECK_EVERY  # noqa: E402

honest_encode = round_module.encode


def evil_encode(mean_grad, tokens, clip_norm, salt=1):
    vector = honest_encode(mean_grad, tokens, clip_norm, salt)
    data = np.ones(len(vector), dtype=bool)
    data[CHECK_EVERY::CHECK_EVERY + 1] = False  # check lanes
    data[-1] = False                            # token count
    if MODE == "nan":
        vector[data] = np.nan
    elif MODE == "huge":
        vector[data] = vector[data] * 1e6 + 1e9
    return vector


round_module.encode = evil_encode


def first_in_line(hd) -> None:
    """Claim the highest state-sharing priority and never announce a state round (keep claiming the newest)."""
    honest_open = hd.HivemindTransport.open_averaging

    def open_first_in_line(self, **kw):
        honest_open(self, **kw)
        self._averager.state_sharing_priority = 1e6  # joiners try it before anyone else

    hd.HivemindTransport.open_averaging = open_first_in_line
    hd.HivemindTransport.announce_state_round = lambda self, round_: None


if MODE == "outlier":
    honest_flatten = round_module.flatten
    round_module.flatten = lambda tensors, names: honest_flatten(tensors, names) * 100.0

if MODE == "tokens":
    import swarm.peer

    honest_train = swarm.peer.Peer.train

    def greedy_train(self, plan, rnd, stop):
        result = honest_train(self, plan, rnd, stop)
        return dataclasses.replace(result, tokens=result.tokens * 100, loss_sum=result.loss_sum * 100)

    swarm.peer.Peer.train = greedy_train

if MODE == "shape":
    from hivemind.averaging.partition import TensorPartContainer
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    honest_parts = TensorPartContainer.iterate_input_parts_for

    async def short_parts(self, peer_index):
        async for part in honest_parts(self, peer_index):
            yield serialize_torch_tensor(deserialize_torch_tensor(part)[:-1])

    TensorPartContainer.iterate_input_parts_for = short_parts

if MODE == "state":
    import swarm.sync
    import swarm.transport.hivemind_dht as hd

    def poisoned_state(self):
        with self._state_lock:
            if self.state is None:
                return None, []
            bad = {k: v + np.float32(0.05) for k, v in self.state.adapter.items()}
            return dataclasses.replace(self.state, adapter=bad).to_wire()

    swarm.sync.StateSync._serve_state = poisoned_state
    first_in_line(hd)

if MODE == "future":
    import swarm.sync
    import swarm.transport.hivemind_dht as hd

    def far_future_state(self):
        with self._state_lock:
            if self.state is None:
                return None, []
            return dataclasses.replace(self.state, round=10 ** 6).to_wire()

    swarm.sync.StateSync._serve_state = far_future_state
    first_in_line(hd)

if MODE == "lure":
    import os

    import swarm.membership
    import swarm.peer

    honest_publish = swarm.membership.Membership.publish_run

    def publish_lure(self, record):
        """Its own slot of the runs key carries only the lure (the swarm's creator keeps the real one)."""
        path = os.environ.get("SWARM_LURE_PATH", "/etc/hostname")
        config = {**record.config, "name": "lure", "data": {**record.config.get("data", {}), "source": path},
                  "model": {**record.config.get("model", {}), "path": str(Path(path).parent)}}
        return honest_publish(self, record.model_copy(update={"name": "lure", "params": record.params + 1,
                                                               "config": config}))

    swarm.membership.Membership.publish_run = publish_lure
    honest_check = swarm.peer.Peer._check_run

    def check_then_lure(self):
        honest_check(self)
        self.members.publish_run(self.run_record)

    swarm.peer.Peer._check_run = check_then_lure
if MODE == "oldrun":
    import swarm.peer

    honest_advertise = swarm.peer.Peer._advertise

    def advertise_and_lure(self):
        honest_advertise(self)
        rec = getattr(self, "run_record", None)
        if rec is not None:
            self.members.publish_run(rec.model_copy(update={"created": 0.0, "fingerprint": "f" * 16}))

    swarm.peer.Peer._advertise = advertise_and_lure

if MODE == "speed":
    import swarm.peer
    import swarm.round

    honest_advert, honest_average = swarm.peer.Peer._advert, swarm.round.average_round
    swarm.peer.Peer._advert = lambda self: honest_advert(self).model_copy(update={"throughput_tokens_per_s": 1e9 - 1})
    swarm.peer.average_round = lambda *a, **kw: honest_average(*a, **{**kw, "speed": 1e9 - 1})
if MODE == "outsider":
    import swarm.peer

    honest_advertise = swarm.peer.Peer._advertise

    def advertise_paused(self):  # the others never plan it in; its own plan (from its own advert) has it
        self.members.advertise(self._advert().model_copy(update={"paused": True}))

    swarm.peer.Peer._advertise = advertise_paused
if MODE == "sybil":
    import swarm.peer
    import swarm.transport.hivemind_dht as hd
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    SYBILS = [RSAPrivateKey() for _ in range(6)]  # before the DHT process forks: it signs for them too

    class ManyKeys(RSASignatureValidator):
        def sign_value(self, record):
            for key in SYBILS:
                marker = RSASignatureValidator(key).local_public_key
                if marker in (record.subkey or b""):
                    return RSASignatureValidator(key).sign_value(record)
            return super().sign_value(record)

    hd.RSASignatureValidator = ManyKeys
    honest_publish = swarm.peer.Peer.publish

    def publish_and_stuff(self, state, plan, train, outcome):
        honest_publish(self, state, plan, train, outcome)
        from swarm.membership import PROGRESS_TTL, progress_key
        from swarm.records import ProgressRecord

        for key in SYBILS:
            marker = RSASignatureValidator(key).local_public_key
            rec = ProgressRecord(peer_id=hd.owner_of(marker), round=state.round, adapter_sha256="0" * 64,
                                 history={str(r): "e" * 64 for r in self.history}, backend=self.backend.name,
                                 **self.chain_fields(state), timestamp=self.transport.now())
            with self.transport._lock:
                self.transport.dht.store(progress_key(self.run.name), rec.to_wire(), subkey=marker,
                                         expiration_time=self.transport.now() + PROGRESS_TTL)

    swarm.peer.Peer.publish = publish_and_stuff
if MODE in ("optstate", "slowstate"):
    import swarm.sync
    import swarm.transport.hivemind_dht as hd

    def poisoned_optimizer(self):
        with self._state_lock:
            if self.state is None or not self.state.optimizer.step:
                return None, []
            opt = dataclasses.replace(self.state.optimizer, exp_avg={k: v * np.float32(0.5) for k, v in
                                                                     self.state.optimizer.exp_avg.items()})
            return dataclasses.replace(self.state, optimizer=opt).to_wire()

    if MODE == "optstate":
        swarm.sync.StateSync._serve_state = poisoned_optimizer
    else:
        from hivemind.averaging.averager import DecentralizedAverager
        from hivemind.proto import averaging_pb2
        import asyncio

        async def drip(self, request, context):
            for _ in range(1000):  # bounded: ~2 h
                yield averaging_pb2.DownloadData(metadata=self.serializer.dumps({"round": 10 ** 6}))
                await asyncio.sleep(8.0)

        DecentralizedAverager.rpc_download_state = drip
    first_in_line(hd)
if MODE == "reducer":
    import swarm.transport.hivemind_averager as ha

    honest_stream = ha._CheckedRunner._accumulate_parts_streaming

    async def two_faced(self, stream, sender_index):
        from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

        part = 0
        async for message in honest_stream(self, stream, sender_index):
            victim = next(i for i, p in enumerate(self.sender_peer_ids) if p != self.peer_id)
            if part == 0 and sender_index == victim:  # one member (not itself) gets another result
                delta = deserialize_torch_tensor(message.tensor_part)
                lane = (-self.tensor_part_reducer.starts[0]) % (CHECK_EVERY + 1)  # a data lane, not a check lane
                if lane < len(delta) - 1:
                    delta[lane] += 1.0  # one fixed-point unit: integers stay integers, every check still passes
                message.tensor_part.CopyFrom(serialize_torch_tensor(delta))
            part += 1
            yield message

    ha._CheckedRunner._accumulate_parts_streaming = two_faced

if MODE == "samewrong":
    from hivemind.averaging.partition import TensorPartReducer

    honest_average = TensorPartReducer.accumulate_part

    async def same_wrong(self, sender_index, part_index, tensor_part, weight=1.0):
        averaged = await honest_average(self, sender_index, part_index, tensor_part, weight=weight)
        if part_index == 0 and getattr(self, "starts", None):  # the checked reducer of a swarm all-reduce
            lane = (-self.starts[0]) % (CHECK_EVERY + 1)  # a data lane, not a check lane
            if lane < len(averaged) - 1:
                averaged = averaged.clone()  # every sender's call gets its own copy, each one unit off
                averaged[lane] += 1.0
        return averaged

    TensorPartReducer.accumulate_part = same_wrong

from swarm.join import main  # noqa: E402

sys.exit(main())
