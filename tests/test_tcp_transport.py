"""The TCP transport (swarm/transport/tcp): addresses, identities, records, channels and live nodes.

Live tests use real sockets on 127.0.0.1 only; every node is shut down by the `nodes` fixture.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import wait_for
from swarm import SwarmError
from swarm.key import SwarmKey
from swarm.transport.tcp import addresses
from swarm.transport.tcp.channel import ChannelError, TlsContexts, decode, dial, encode
from swarm.transport.tcp.identity import Identity, load_or_create, public_key_of, verify
from swarm.transport.tcp.records import STALE, Limits, RecordStore, SignedRecord, sign
from swarm.transport.tcp.transport import TcpTransport

ROOT = Path(__file__).resolve().parent.parent
LOCAL = "127.0.0.1"


@pytest.fixture
def nodes():
    """start(**kw) -> a TcpTransport on 127.0.0.1; all are shut down at teardown."""
    started: list[TcpTransport] = []

    def start(**kw) -> TcpTransport:
        t = TcpTransport(host=LOCAL, **kw)
        started.append(t)
        return t

    yield start
    for t in started:
        t.shutdown()


# --- addresses ------------------------------------------------------------------------------
def test_addresses_parse_and_format():
    pid = Identity.generate().peer_id
    text = addresses.format_address(LOCAL, 31337, pid)
    assert text == f"/ip4/127.0.0.1/tcp/31337/p2p/{pid}"
    addr = addresses.parse(text)
    assert (addr.host, addr.port, addr.peer_id, addr.family) == (LOCAL, 31337, pid, "ip4")
    assert str(addr) == text
    assert addresses.parse(f"/ip6/::1/tcp/5/p2p/{pid}").host == "::1"
    assert addresses.parse(f"/dns4/peer.example.org/tcp/5/p2p/{pid}").family == "dns4"
    assert addresses.parse("/dns6/peer.example.org/tcp/5", require_peer_id=False).peer_id is None


@pytest.mark.parametrize("text, why", [
    ("/ip4/1.2.3.4/tcp/1", "expected /ip4|ip6|dns4|dns6/HOST/tcp/PORT/p2p/PEER_ID"),
    ("/ip4/1.2.3/tcp/1/p2p/X", "not a valid multiaddr"),
    ("/ip4/1.2.3.4/udp/1/p2p/{pid}", "not a TCP peer address"),
    ("/ip4/1.2.3.4/tcp/0/p2p/{pid}", "out of range"),
    ("/ip4/1.2.3.4/tcp/70000/p2p/{pid}", "not a valid multiaddr"),
    ("/ip4/1.2.3.4/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "not an Ed25519 peer id"),
    ("/ip4/1.2.3.4/tcp/1/p2p/{pid}/tcp/2", "not a TCP peer address"),
    ("garbage", "not a valid multiaddr"),
    ("", "1 to 512 characters"),
    (7, "not int"),
])
def test_bad_addresses_are_one_line_errors(text, why):
    if isinstance(text, str):
        text = text.format(pid=Identity.generate().peer_id)
    with pytest.raises(ValueError) as e:
        addresses.parse(text)
    assert why in str(e.value) and "\n" not in str(e.value)


# --- identity --------------------------------------------------------------------------------
def test_identity_file_round_trip(tmp_path):
    path = tmp_path / "out" / "identity.ed25519"
    first = load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 or os.name == "nt"
    assert load_or_create(path).peer_id == first.peer_id
    assert first.peer_id.startswith("12D3KooW") and len(first.peer_id) == 52
    assert verify(first.peer_id, first.sign(b"m"), b"m") and not verify(first.peer_id, first.sign(b"m"), b"n")
    assert not verify(Identity.generate().peer_id, first.sign(b"m"), b"m")
    public_key_of(first.peer_id).verify(first.sign(b"x"), b"x")


@pytest.mark.parametrize("content, why", [(b"not a key", "not a PEM private key"), (b"", "not a PEM private key")])
def test_corrupt_identity_file_is_a_one_line_error(tmp_path, content, why):
    path = tmp_path / "identity.ed25519"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_or_create(path)
    assert why in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == content  # never replaced


def test_identity_of_another_key_type_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "identity.ed25519"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        load_or_create(path)
    with pytest.raises(SwarmError, match="not an Ed25519 key"):
        TcpTransport(host=LOCAL, identity=path)


@given(st.text(max_size=80))
@settings(max_examples=200, deadline=None, database=None)
def test_peer_id_parsing_never_crashes(text):
    try:
        public_key_of(text)
    except ValueError:
        pass


# --- records ---------------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def value(x) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


def test_record_sign_verify_and_replay():
    me, clock = Identity.generate(), Clock()
    store = RecordStore(Limits(), clock)
    rec = sign(me, "k", value({"a": 1}), 1010.0)
    assert store.add(rec) is None
    assert store.get("k") == [rec]
    assert store.add(rec) == STALE                                   # the same record again
    newer = sign(me, "k", value({"a": 2}), 1020.0)
    assert store.add(newer) is None and store.get("k") == [newer]
    assert store.add(rec) == STALE                                   # a replay of the older one
    assert store.get("k") == [newer]
    # forged: a value changed, a signature moved to another key or owner, a signature of garbage
    other = Identity.generate()
    forged = [
        SignedRecord("k", me.peer_id, value({"a": 3}), 1030.0, newer.signature),
        SignedRecord("k2", me.peer_id, newer.value, newer.expiration, newer.signature),
        SignedRecord("k", other.peer_id, newer.value, 1030.0, newer.signature),
        SignedRecord("k", me.peer_id, value(1), 1030.0, b"\0" * 64),
        SignedRecord("k", "not-an-id", value(1), 1030.0, b"\0" * 64),
        SignedRecord("k", me.peer_id, value(1), 1030.0, b"short"),
    ]
    for rec in forged:
        assert store.add(rec) == "bad signature", rec
    assert store.get("k") == [newer]
    # expiry
    assert store.add(sign(other, "k", value(1), 999.0)) == "expired"
    clock.t = 1025.0
    assert store.get("k") == [] and store.purge() == 1 and len(store) == 0 and store.total_bytes == 0


def test_record_caps():
    me, clock = Identity.generate(), Clock()
    lim = Limits(max_value_bytes=100, max_records_per_key=3, max_key_chars=10, max_keys=4, max_keys_per_owner=3,
                 max_total_bytes=1000, max_ttl=60.0)
    store = RecordStore(lim, clock)
    assert store.add(sign(me, "k", value(b"x" * 101), 1010.0)) == "value too large"
    assert store.add(sign(me, "k" * 11, value(1), 1010.0)) == "bad key length"
    assert store.add(sign(me, "", value(1), 1010.0)) == "bad key length"
    assert store.add(sign(me, "k", value(1), 1061.0)) == "expiration too far ahead"
    assert store.add(sign(me, "k", b"\xc1", 1010.0)) == "value is not msgpack"
    owners = [Identity.generate() for _ in range(5)]
    for i, o in enumerate(owners[:3]):
        assert store.add(sign(o, "k", value(i), 1010.0 + i)) is None
    assert store.add(sign(owners[3], "k", value(3), 1005.0)) == "key full"  # expires before all held ones
    assert store.add(sign(owners[3], "k", value(3), 1050.0)) is None         # evicts the one expiring first
    assert sorted(r.owner for r in store.get("k")) == sorted(o.peer_id for o in owners[1:4])
    for key in ("a", "b"):
        assert store.add(sign(me, key, value(1), 1010.0)) is None
    assert store.add(sign(me, "c", value(1), 1010.0)) is None
    assert store.add(sign(me, "d", value(1), 1010.0)) == "too many keys"     # 4 keys: k, a, b, c
    assert store.add(sign(me, "k", value(1), 1010.0)) == "too many keys for one owner"
    big = RecordStore(Limits(max_value_bytes=600, max_total_bytes=1000), clock)
    assert big.add(sign(me, "a", value(b"x" * 500), 1010.0)) is None
    assert big.add(sign(me, "b", value(b"x" * 500), 1010.0)) == "store full"
    assert big.add(sign(me, "a", value(b"x" * 510), 1020.0)) is None          # replacing counts the difference
    assert big.refused == {"store full": 1}


wire_items = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=70),
    lambda inner: st.lists(inner, max_size=6), max_leaves=12)


@given(wire_items)
@settings(max_examples=300, deadline=None, database=None)
def test_fuzzed_records_are_refused_cleanly(item):
    store = RecordStore(Limits(), Clock())
    try:
        rec = SignedRecord.from_wire(item)
    except ValueError:
        return
    assert store.add(rec) is not None


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None, database=None)
def test_fuzzed_frame_bodies_decode_or_fail_cleanly(body):
    try:
        msg = decode(body)
    except ChannelError:
        return
    assert isinstance(msg, dict) and isinstance(msg["t"], str)


def test_frames_are_capped_on_send():
    assert decode(encode({"t": "x", "v": b"1"})[4:]) == {"t": "x", "v": b"1"}
    with pytest.raises(ValueError, match="exceeds"):
        encode({"t": "x", "v": b"1" * 200}, max_frame=100)


# --- live nodes -------------------------------------------------------------------------------
def test_three_nodes_spread_records_and_a_late_joiner_catches_up(nodes, tmp_path):
    a = nodes(identity=tmp_path / "a.key")
    first = a.visible_maddrs()
    assert len(first) == 1 and first[0].endswith(f"/p2p/{a.peer_id}") and "/127.0.0.1/" in first[0]
    b, c = nodes(initial_peers=first), nodes(initial_peers=first)
    assert c.put("adverts", {"round": 1, "peer": "c", "data": b"\x00\x01"}, ttl=30)
    start = time.monotonic()
    for t in (a, b, c):
        got = wait_for(lambda: t.get("adverts"), 5.0, "the record on every node")
        assert [(r.owner, r.value) for r in got] == [(c.peer_id, {"round": 1, "peer": "c", "data": b"\x00\x01"})]
        assert c.now() < got[0].expiration <= c.now() + 30
    assert time.monotonic() - start < 5.0
    # every node's value under one key, one record per owner; a newer put replaces the older
    assert a.put("adverts", [1, 2], ttl=30) and b.put("adverts", "b", ttl=30)
    assert c.put("adverts", {"round": 2}, ttl=40)
    want = {a.peer_id: [1, 2], b.peer_id: "b", c.peer_id: {"round": 2}}
    for t in (a, b, c):
        wait_for(lambda: {r.owner: r.value for r in t.get("adverts")} == want, 5.0, "three owners' values")
    assert not c.put("adverts", "shorter", ttl=5)  # would not outlive the record it replaces: refused
    # peer exchange: b and c were given only a's address, yet they meet
    wait_for(lambda: c.peer_id in b.peers(), 5.0, "b connected to c")
    # a late joiner, given only b's address, gets the existing records
    d = nodes(initial_peers=b.visible_maddrs())
    wait_for(lambda: {r.owner: r.value for r in d.get("adverts")} == want, 5.0, "the late joiner's sync")
    # a restarted a keeps its id (its key file)
    a.shutdown()
    assert nodes(identity=tmp_path / "a.key", initial_peers=d.visible_maddrs()).peer_id == a.peer_id


def test_an_address_naming_another_peer_is_refused(nodes):
    a = nodes()
    wrong = addresses.format_address(LOCAL, addresses.parse(a.visible_maddrs()[0]).port, Identity.generate().peer_id)
    with pytest.raises(SwarmError) as e:
        nodes(initial_peers=[wrong])
    assert f"is peer {a.peer_id}, not" in str(e.value) and "as its address says" in str(e.value)
    with pytest.raises(SwarmError, match="not a TCP peer address"):
        nodes(initial_peers=["/ip4/127.0.0.1/tcp/1"])
    free = socket.socket()
    free.bind((LOCAL, 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(SwarmError, match="could not reach any initial peer"):
        nodes(initial_peers=[addresses.format_address(LOCAL, port, a.peer_id)])


def test_private_swarm_refuses_strangers(nodes):
    key, other = SwarmKey(b"k" * 32), SwarmKey(b"o" * 32)
    a = nodes(swarm_key=key)
    b = nodes(swarm_key=key, initial_peers=a.visible_maddrs())
    for stranger_key in (other, None):
        with pytest.raises(SwarmError, match="refused the connection|not in this private swarm"):
            nodes(swarm_key=stranger_key, initial_peers=a.visible_maddrs())
    # a member dialing an open peer refuses it too
    open_peer = nodes()
    with pytest.raises(SwarmError, match="is not in this private swarm"):
        nodes(swarm_key=key, initial_peers=open_peer.visible_maddrs())
    assert b.put("k", 1, ttl=30)
    wait_for(lambda: a.get("k"), 5.0, "a member's record")
    assert a.peers() == [b.peer_id]


async def _garbage(port: int, peer_id: str, rounds: int, seed: int) -> int:
    """Send `rounds` connections' worth of garbage at a live node; the number of frames sent."""
    rng = random.Random(seed)
    me = Identity.generate()
    tls = TlsContexts(me)
    stranger = Identity.generate()
    forged = SignedRecord("k", stranger.peer_id, value(1), time.time() + 30, b"\1" * 64).to_wire()
    bad = [
        lambda: (2 ** 32 - 1).to_bytes(4, "big"),                              # announces 4 GiB
        lambda: (5 << 20).to_bytes(4, "big") + b"x" * 100,                     # over the 4 MiB cap
        lambda: (100).to_bytes(4, "big") + b"short",                           # truncated
        lambda: (lambda b: len(b).to_bytes(4, "big") + b)(rng.randbytes(rng.randrange(1, 200))),  # random body
        lambda: encode({"t": 1}),                                              # wrong type of "t"
        lambda: (lambda b: len(b).to_bytes(4, "big") + b)(msgpack.packb([1, 2])),  # not a map
        lambda: (lambda b: len(b).to_bytes(4, "big") + b)(b"\x91" * 5000 + b"\x90"),  # deep nesting
        lambda: encode({"t": "rec", "r": "x"}),
        lambda: encode({"t": "rec", "r": [[1, 2, 3]]}),
        lambda: encode({"t": "rec", "r": [forged]}),
        lambda: encode({"t": "rec", "r": [[None] * 5] * 2000}),                  # over the batch cap
    ]
    sent = 0
    for i in range(rounds):
        if i % 4 == 0:  # not even TLS: random bytes at the listener
            _, w = await asyncio.open_connection(LOCAL, port)
            w.write(rng.randbytes(rng.randrange(1, 3000)))
            await w.drain()
            w.close()
            sent += 1
            continue
        ch = await dial(LOCAL, port, peer_id, me, tls)
        # harmless noise first: unknown types and stale records are ignored, not punished
        for _ in range(20):
            ch.writer.write(encode({"t": "future-type", "x": rng.randbytes(10)}))
        kind = i % len(bad)
        ch.writer.write(bad[kind]())
        sent += 21
        if kind == 2:  # truncated: the node waits for the rest of the frame, until the connection ends
            await ch.writer.drain()
            ch.close()
            continue
        try:
            await ch.writer.drain()
            await asyncio.wait_for(ch.reader.read(), 5.0)  # the node closes the connection: read() ends
        except (ConnectionError, OSError):
            pass
        ch.close()
    return sent


def test_live_node_survives_garbage_and_still_serves(nodes):
    a = nodes()
    b = nodes(initial_peers=a.visible_maddrs())
    assert a.put("k", "before", ttl=60)
    wait_for(lambda: b.get("k"), 5.0, "the record before the flood")
    port = addresses.parse(a.visible_maddrs()[0]).port
    sent = asyncio.run(_garbage(port, a.peer_id, rounds=160, seed=1))
    assert sent > 2000
    drops = a.node.disconnects
    for reason in ("a frame announced 4294967295 bytes", "a frame announced 5242880 bytes", "connection closed mid-frame",
                   "undecodable frame", "a frame is not a map with a string type", "forged record under 'k'",
                   "a record batch is not a list of at most 1024", "malformed record"):
        assert any(reason in k for k in drops) or reason.split(" (")[0][:60] in drops, (reason, drops)
    # still serving: old connections, new records, new peers
    assert b.peer_id in a.peers()
    assert b.put("k", "after", ttl=60)
    wait_for(lambda: {r.value for r in a.get("k")} == {"before", "after"}, 5.0, "a record after the flood")
    c = nodes(initial_peers=a.visible_maddrs())
    wait_for(lambda: len(c.get("k")) == 2, 5.0, "a new peer's sync after the flood")
    assert a.get("future-type") == []


def test_not_reducing_while_idle(nodes):
    assert nodes().reducing() is False


NO_HIVEMIND = textwrap.dedent("""
    import sys, time
    BLOCKED = set(sys.argv[1].split(","))
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(name + " is blocked in this test")
    sys.meta_path.insert(0, Refuse())
    from swarm.transport.tcp.transport import TcpTransport
    a = TcpTransport(host="127.0.0.1")
    b = TcpTransport(host="127.0.0.1", initial_peers=a.visible_maddrs())
    assert b.put("k", {"v": [1, 2]}, ttl=30)
    deadline = time.monotonic() + 10
    while not a.get("k") and time.monotonic() < deadline:
        time.sleep(0.02)
    got = a.get("k")
    loop = type(a.node._runner.loop).__module__.split(".")[0]
    a.shutdown(); b.shutdown()
    assert [r.value for r in got] == [{"v": [1, 2]}], got
    assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
    print("ok", got[0].owner == b.peer_id, loop)
""")


@pytest.mark.parametrize("blocked, loop", [("hivemind", "uvloop"), ("hivemind,uvloop", "asyncio")])
def test_works_where_hivemind_cannot_be_imported(blocked, loop):
    """`import hivemind` fails in the child process (and `import uvloop` too, as on Windows)."""
    pytest.importorskip("uvloop") if loop == "uvloop" else None
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", NO_HIVEMIND, blocked], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["ok", "True", loop], out.stderr[-3000:]


def test_channel_frame_limits_on_a_plain_socket():
    """Over plain streams (the framing does not depend on TLS): oversize, truncated and late frames."""
    from swarm.transport.tcp.channel import Channel

    async def main() -> list[str]:
        inbox: asyncio.Queue = asyncio.Queue()

        async def serve(reader, writer):
            ch = Channel(reader, writer, "peer", dialer=False, max_frame=1000)
            ch.body_timeout = 0.2
            while True:
                try:
                    await inbox.put(await ch.recv(idle_timeout=0.3))
                except ChannelError as e:
                    await inbox.put(str(e))
                    ch.close()
                    return

        server = await asyncio.start_server(serve, LOCAL, 0)
        port = server.sockets[0].getsockname()[1]
        out = []
        for data in [encode({"t": "a"}) + (1001).to_bytes(4, "big"), (100).to_bytes(4, "big") + b"late",
                     encode({"t": "b"}) + b"\x00\x00", (3).to_bytes(4, "big") + b"\xc1\xc1\xc1", b""]:
            _, w = await asyncio.open_connection(LOCAL, port)
            w.write(data)
            await w.drain()
            if data.startswith(encode({"t": "b"})):
                w.close()
            while True:
                msg = await asyncio.wait_for(inbox.get(), 5)
                out.append(msg if isinstance(msg, str) else msg["t"])
                if isinstance(msg, str):
                    break
            w.close()
        server.close()
        await server.wait_closed()
        return out

    assert asyncio.run(main()) == ["a", "a frame announced 1001 bytes (limit 1000)", "a 100-byte frame did not arrive within 0.2s",
                                   "b", "connection closed mid-frame", "undecodable frame (FormatError)",
                                   "the peer was silent for 0.3s"]


def test_fuzzed_frames_and_records_at_a_live_node(nodes):
    """Hypothesis-made frames (random bodies, random maps, random record batches) at a live node: it
    drops the sender or ignores the frame, and still serves records afterwards."""
    a = nodes()
    assert a.put("k", "kept", ttl=60)
    port = addresses.parse(a.visible_maddrs()[0]).port
    me = Identity.generate()
    tls = TlsContexts(me)
    bodies = st.one_of(
        st.binary(max_size=200),
        st.builds(lambda d: msgpack.packb(d, use_bin_type=True), st.dictionaries(st.text(max_size=3), wire_items, max_size=3)),
        st.builds(lambda r: msgpack.packb({"t": "rec", "r": r}, use_bin_type=True), st.lists(wire_items, max_size=4)),
    )

    async def send(frames: list[bytes]) -> None:
        ch = await dial(LOCAL, port, a.peer_id, me, tls)
        for body in frames:
            ch.writer.write(len(body).to_bytes(4, "big") + body)
        try:
            await ch.writer.drain()
        except (ConnectionError, OSError):
            pass
        ch.close()

    @given(st.lists(bodies, min_size=1, max_size=5))
    @settings(max_examples=60, deadline=None, database=None)
    def fuzz(frames):
        asyncio.run(send(frames))

    fuzz()
    b = nodes(initial_peers=a.visible_maddrs())
    wait_for(lambda: [r.value for r in b.get("k")] == ["kept"], 5.0, "a record served after the fuzzing")
    assert b.peer_id in a.peers()


CHILD_NODE = textwrap.dedent("""
    import sys, time
    from swarm.transport.tcp.transport import TcpTransport
    t = TcpTransport(host="127.0.0.1")
    t.put("hello", "from the child", ttl=60)
    print(t.visible_maddrs()[0], flush=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        replies = [r for r in t.get("reply") if r.owner != t.peer_id]
        if replies:
            print("reply", replies[0].value, replies[0].owner, flush=True)
            break
        time.sleep(0.02)
    t.shutdown()
""")


def test_nodes_in_separate_processes(nodes):
    """A node in a child process and two here: records cross the process boundary both ways."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD_NODE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=ROOT)
    try:
        maddr = child.stdout.readline().strip()
        child_id = addresses.parse(maddr).peer_id
        b = nodes(initial_peers=[maddr])
        c = nodes(initial_peers=b.visible_maddrs())  # reaches the child through b
        wait_for(lambda: [(r.owner, r.value) for r in c.get("hello")] == [(child_id, "from the child")], 5.0,
                 "the child's record on c")
        assert c.put("reply", 42, ttl=60)
        out, err = child.communicate(timeout=20)
        assert out.split() == ["reply", "42", c.peer_id], err[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_pings_keep_quiet_peers_and_silent_ones_are_dropped(nodes, monkeypatch):
    import swarm.transport.tcp.node as node_module
    import swarm.transport.tcp.peer as peer_module

    monkeypatch.setattr(peer_module, "PING_INTERVAL", 0.1)
    monkeypatch.setattr(node_module, "IDLE_TIMEOUT", 0.6)
    a = nodes()
    b = nodes(initial_peers=a.visible_maddrs())
    port = addresses.parse(a.visible_maddrs()[0]).port

    async def silent() -> bytes:
        ch = await dial(LOCAL, port, a.peer_id, Identity.generate(), TlsContexts(Identity.generate()))
        start = time.monotonic()
        while time.monotonic() - start < 5:
            try:
                await ch.recv()  # a's sync and pings, until a drops this silent peer
            except ChannelError:
                break
        ch.close()
        return time.monotonic() - start

    assert 0.5 < asyncio.run(silent()) < 3
    assert a.node.disconnects.get("the peer was silent for 0.6s") == 1
    time.sleep(1.0)
    assert a.peers() == [b.peer_id] and b.peers() == [a.peer_id]  # quiet but pinging: kept
