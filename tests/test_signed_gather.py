"""Group announcements are signed with the member's swarm key and bound to its libp2p id and to the
group: a tampered, misattributed or replayed announcement names nobody."""

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def transports():
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.p2p import PeerID
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm.transport.hivemind_dht import HivemindTransport, owner_of

    out = []
    for _ in range(2):
        t = HivemindTransport.__new__(HivemindTransport)  # only the signing parts: no DHT, no daemon
        t._key = RSAPrivateKey()
        t._signer = RSASignatureValidator(t._key)
        t.peer_id = owner_of(t._signer.local_public_key)
        t.dht = SimpleNamespace(peer_id=PeerID.from_base58(
            "12D3KooWCJLcpCHZZejn2PAtDuAFGJt9LLB7zCEp9qNne9sffiyr" if not out else
            "12D3KooWN8mizzmXM3c4vah4kZWc7zD9AFyHEZ4h1AsxTThvvEQP"))
        out.append(t)
    return out


def test_a_signed_announcement_names_its_signer(transports):
    a, _ = transports
    g = {"peer": a.peer_id, "round": 3, "tokens": 2048, "salt": 12345, "norm": 0.5}
    w = a._sign(g, "default.r3")
    assert a._verify(w, a.dht.peer_id.to_base58(), "default.r3") == a.peer_id


def test_tampered_misattributed_or_replayed_announcements_name_nobody(transports):
    a, b = transports
    g = {"peer": a.peer_id, "round": 3, "tokens": 2048, "salt": 12345, "norm": 0.5}
    w = a._sign(g, "default.r3")
    mine = a.dht.peer_id.to_base58()
    assert a._verify(dict(w, g=dict(g, tokens=999999)), mine, "default.r3") is None   # body changed
    assert a._verify(w, b.dht.peer_id.to_base58(), "default.r3") is None            # relayed as another libp2p peer
    assert a._verify(w, mine, "default.r4") is None                                 # replayed into another group
    assert a._verify(dict(w, k=b._signer.local_public_key), mine, "default.r3") is None  # someone else's key
    assert a._verify(dict(w, s=b"garbage"), mine, "default.r3") is None
    assert a._verify({"g": g}, mine, "default.r3") is None
    assert a._verify("not a dict", mine, "default.r3") is None
