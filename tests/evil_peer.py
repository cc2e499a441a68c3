"""A hostile peer for tests, built from swarm's own internals: it trains honestly, then corrupts what it sends.

usage: python tests/evil_peer.py {nan,huge,shape} [python -m swarm.join arguments]

  nan    every gradient value of its contribution is NaN (check lanes and token count left honest)
  huge   its gradient is scaled a millionfold: integers still, far above the clip bound
  shape  every part it sends a reducer is one value short (its own vector, and so its schema, is right)
"""

from __future__ import annotations

import sys

import numpy as np

MODE = sys.argv.pop(1)
assert MODE in ("nan", "huge", "shape"), MODE

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

if MODE == "shape":
    from hivemind.averaging.partition import TensorPartContainer
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    honest_parts = TensorPartContainer.iterate_input_parts_for

    async def short_parts(self, peer_index):
        async for part in honest_parts(self, peer_index):
            yield serialize_torch_tensor(deserialize_torch_tensor(part)[:-1])

    TensorPartContainer.iterate_input_parts_for = short_parts

from swarm.join import main  # noqa: E402

sys.exit(main())
