"""Signed, schema-checked DHT records between two real hivemind peers on 127.0.0.1."""

from __future__ import annotations

import pytest

from swarm.membership import Membership, adverts_key
from swarm.records import CapabilityAdvert


@pytest.fixture(scope="module")
def pair():
    from swarm.transport.hivemind_dht import HivemindTransport

    a = HivemindTransport(host="127.0.0.1")
    b = HivemindTransport(host="127.0.0.1", initial_peers=a.visible_maddrs())
    yield a, b
    b.shutdown()
    a.shutdown()


def _advert(peer_id: str, **kw) -> dict:
    base = dict(peer_id=peer_id, run="r", backend="cpu", device="x", tier="cpu-only", memory_total_bytes=8 << 30,
                memory_usable_bytes=4 << 30, throughput_tokens_per_s=100.0, max_micro_batch=4, timestamp=1.0)
    base.update(kw)
    return CapabilityAdvert(**base).to_wire()


def test_honest_adverts_are_read_back(pair):
    a, b = pair
    assert Membership(a).advertise(CapabilityAdvert.model_validate(_advert(a.peer_id)))
    got = {x.peer_id for x in Membership(b).adverts("r")}
    assert a.peer_id in got


def test_an_advert_claiming_another_peers_id_is_dropped(pair):
    a, b = pair
    forged = _advert(a.peer_id, throughput_tokens_per_s=1e6)  # b pretends to be a, and very fast
    assert b.put(adverts_key("r2"), forged, 30)
    m = Membership(a)
    assert m.adverts("r2") == []
    assert "claims peer_id" in m.rejected[b.peer_id]


def test_writing_under_another_peers_key_is_refused_by_the_signature_validator(pair):
    a, b = pair
    # b stores under a's owner marker: its signature cannot match a's public key
    stored = b.dht.store(adverts_key("r3"), _advert(a.peer_id), expiration_time=b.now() + 30,
                         subkey=a._signer.local_public_key)
    assert not stored
    assert Membership(a).adverts("r3") == []


@pytest.mark.parametrize("mutate", [
    dict(memory_total_bytes=-1),
    dict(throughput_tokens_per_s=float("nan")),
    dict(memory_total_bytes="8GB"),
    dict(version=2, new_field=1),
    dict(memory_usable_bytes=1 << 60),
    dict(backend="quantum"),
])
def test_malformed_records_never_reach_the_planner(pair, mutate):
    a, b = pair
    raw = {**_advert(b.peer_id), **mutate}
    key = adverts_key("bad" + str(abs(hash(str(mutate)))))
    assert b.put(key, raw, 30)
    m = Membership(a)
    assert m.adverts(key.split(".")[1]) == []
    assert b.peer_id in m.rejected
