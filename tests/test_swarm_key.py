"""Private swarms (swarm.key): records, announcements and group admission need the swarm key (pure parts),
and a keyed 2-peer swarm trains while a peer with another key is never counted (real processes)."""

from __future__ import annotations

import dataclasses
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
