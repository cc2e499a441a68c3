"""Private swarms (swarm.key): records, announcements and group admission need the swarm key (pure parts),
and a keyed 2-peer swarm trains while a peer with another key is never counted (real processes)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from swarm import SwarmError
from swarm.key import SwarmKey, create, load, main


def test_create_load_and_refuse_bad_files(tmp_path, capsys):
    k = create(tmp_path / "k")
    assert load(tmp_path / "k") == k and (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    with pytest.raises(SwarmError, match="never overwritten"):
        create(tmp_path / "k")
    (tmp_path / "bad").write_text("hello")
    for path in (tmp_path / "bad", tmp_path / "missing"):
        with pytest.raises(SwarmError):
            load(path)
    assert main([str(tmp_path / "k2")]) == 0 and main([str(tmp_path / "k2")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_dht_records_need_the_swarm_key():
    from hivemind.dht.validation import CompositeValidator, DHTRecord
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm.transport.hivemind_dht import SwarmKeyValidator

    k, other = SwarmKey(b"a" * 32), SwarmKey(b"b" * 32)
    rsa = RSASignatureValidator(RSAPrivateKey())
    member = CompositeValidator([rsa, SwarmKeyValidator(k)])
    stranger = CompositeValidator([rsa, SwarmKeyValidator(other)])
    open_peer = CompositeValidator([rsa])
    rec = DHTRecord(b"key", rsa.local_public_key, b"\x93\x01\x02\x03", 123.5)
    signed = dataclasses.replace(rec, value=member.sign_value(rec))
    assert member.validate(signed) and member.strip_value(signed) == rec.value
    assert not stranger.validate(signed)              # another key
    assert not open_peer.validate(signed)             # an open peer does not read a private swarm either
    assert not member.validate(dataclasses.replace(rec, value=open_peer.sign_value(rec)))  # no key
    assert not member.validate(dataclasses.replace(rec, value=stranger.sign_value(rec)))
    assert not member.validate(dataclasses.replace(signed, expiration_time=1e10))  # a member's record, extended
    assert not member.validate(dataclasses.replace(signed, key=b"other key"))       # ... or moved


def test_group_announcements_need_the_swarm_key():
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.p2p import PeerID
    from hivemind.utils import MSGPackSerializer
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm.transport.hivemind_averager import is_member
    from swarm.transport.hivemind_dht import HivemindTransport, owner_of

    def transport(key, p2p):
        t = HivemindTransport.__new__(HivemindTransport)
        t._key = RSAPrivateKey()
        t._signer = RSASignatureValidator(t._key)
        t.peer_id, t.swarm_key = owner_of(t._signer.local_public_key), key
        t.dht = SimpleNamespace(peer_id=PeerID.from_base58(p2p))
        return t

    k = SwarmKey(b"k" * 32)
    a = transport(k, "12D3KooWCJLcpCHZZejn2PAtDuAFGJt9LLB7zCEp9qNne9sffiyr")
    x = transport(SwarmKey(b"x" * 32), "12D3KooWN8mizzmXM3c4vah4kZWc7zD9AFyHEZ4h1AsxTThvvEQP")
    n = transport(None, "12D3KooWN8mizzmXM3c4vah4kZWc7zD9AFyHEZ4h1AsxTThvvEQP")
    g = {"peer": "p", "round": 1}
    ida, idx = a.dht.peer_id.to_base58(), x.dht.peer_id.to_base58()
    wa, wx, wn = a._sign(g, "r1"), x._sign(g, "r1"), n._sign(g, "r1")
    assert a._verify(wa, ida, "r1") == a.peer_id
    assert a._verify(wx, idx, "r1") is None and a._verify(wn, idx, "r1") is None
    assert n._verify(wx, idx, "r1") == x.peer_id               # an open swarm needs no key
    assert is_member(k, MSGPackSerializer.dumps(wa), ida.encode())
    assert not is_member(k, MSGPackSerializer.dumps(wa), idx.encode())  # a member's announcement, replayed by another id
    assert not is_member(k, MSGPackSerializer.dumps(wx), idx.encode()) and not is_member(k, b"junk", idx.encode())
    assert is_member(None, b"junk", idx.encode())


@pytest.mark.slow
def test_keyed_swarm_trains_and_refuses_a_peer_with_another_key(peers, tmp_path):
    """a and b share a key and train; x (another key) joins through a's address: it is never in a group, its
    records are never counted, and a serves it no state."""
    import asyncio

    from conftest import metrics
    from swarm.transport.hivemind_dht import peer_id_of

    create(tmp_path / "k"), create(tmp_path / "other")
    common = ["--max-rounds", "6", "--min-peers", "2"]
    peers.start("a", *common, "--swarm-key", str(tmp_path / "k"))
    addrs = peers.addrs("a")
    peers.start("b", *common, "--swarm-key", str(tmp_path / "k"), initial_peers=addrs)
    peers.start("x", "--max-rounds", "2", "--swarm-key", str(tmp_path / "other"), initial_peers=addrs)
    end = time.monotonic() + 240
    while not metrics(peers.base / "a" / "metrics.jsonl"):
        assert time.monotonic() < end and peers.procs["a"].poll() is None, peers.log("a")[-3000:]
        time.sleep(0.2)

    async def download_as_outsider() -> int:
        from hivemind.p2p import P2P, PeerID
        from hivemind.proto import averaging_pb2
        from swarm.transport.hivemind_averager import SwarmAverager

        p2p = await P2P.create(initial_peers=addrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False,
                               use_relay=False, auto_nat=False)
        try:
            stub = SwarmAverager.get_stub(p2p, PeerID.from_base58(addrs[0].rsplit("/p2p/", 1)[1]), namespace="default_avg")
            return len([m async for m in await stub.rpc_download_state(averaging_pb2.DownloadRequest())])
        finally:
            await p2p.shutdown()

    assert asyncio.run(asyncio.wait_for(download_as_outsider(), 60)) == 0
    for name in "ab":
        assert peers.wait(name, 300) == 0, peers.log(name)[-3000:]
    ids = {n: peer_id_of(peers.base / n / "identity.key") for n in "abx"}
    ma, mb = (metrics(peers.base / n / "metrics.jsonl") for n in "ab")
    assert [m["round"] for m in ma] == list(range(1, 7)) == [m["round"] for m in mb]
    for m1, m2 in zip(ma, mb):
        assert m1["adapter_sha256"] == m2["adapter_sha256"] and m1["members"] == sorted([ids["a"], ids["b"]])
    assert ids["x"] not in peers.log("a") + peers.log("b")  # never planned, counted or named
    assert "refused a state download to" in (peers.base / "a" / "network.log").read_text()


def test_a_replaced_run_record_never_stops_a_running_peer():
    """Security review, scenario 5: one DHT store of an older record of the same run name made every peer exit."""
    from swarm.peer import Peer
    from swarm.records import RunRecord

    def record(fp, created):
        return RunRecord(name="default", protocol=1, fingerprint=fp, base_sha256="0" * 64, model="m", params=1,
                         config={}, created=created)

    mine, lure = record("mine", 100.0), record("evil", 0.0)
    warned = []
    p = Peer.__new__(Peer)
    p.run, p.run_record = SimpleNamespace(name="default"), mine
    p.members = SimpleNamespace(runs=lambda: {"default": lure})
    p.log = SimpleNamespace(warn=lambda msg, *a: warned.append(msg))
    p.verify_run()
    p.verify_run()
    assert p.run_record is mine and len(warned) == 1 and "keeps the run it joined" in warned[0]
