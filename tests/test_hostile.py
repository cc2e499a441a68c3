"""Untrusted contributions, in real swarms on 127.0.0.1: a hostile peer (scripts/hostile_peer.py, built from
swarm's own internals) sends NaN, out-of-bound or wrongly shaped gradients. Its contribution must be
rejected, the peer named, the round go on without it, and the honest peers apply exactly the sum of
their own contributions: each round's `sum_checksum` (a linear checksum of the integer sum the group
applied) must equal the sum of the honest members' `contribution_checksum`s."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import identity_of, metrics

pytestmark = pytest.mark.slow

EVIL = [str(Path(__file__).resolve().parent.parent / "scripts" / "hostile_peer.py")]
ROUNDS = 4
REASONS = {"nan": "NaN", "huge": "norm it announced", "shape": "shape", "outlier": "the group's median",
           "tokens": "its quota in this round's plan"}


@pytest.fixture
def transport(request):
    """This file's own `transport` (conftest's, narrowed): tcp only where a case says so (`transport_cases`)."""
    return request.param


def transport_cases(modes, tcp_modes):
    """(mode, transport) cases: every mode over hivemind, `tcp_modes` over tcp too."""
    return [pytest.param(m, t, id=f"{m}-{t}") for m in modes for t in ("hivemind", "tcp") if t == "hivemind" or m in tcp_modes]


# nan patches swarm.round.encode (transport-independent); "shape" patches hivemind's partition, and the other modes
# cost a real swarm each: one tcp case is enough to show the tcp reducer's checks reject, name and exclude
@pytest.mark.parametrize("mode, transport", transport_cases(list(REASONS), {"nan"}), indirect=["transport"])
def test_hostile_contribution_is_rejected_named_and_excluded(peers, mode, tmp_path, transport):
    from swarm.averaging import add_checksums

    common = ["--max-rounds", str(ROUNDS), "--min-peers", "3"]
    if mode == "outlier":  # a loose clip: only the group-relative bound (averaging.max_norm_ratio) can catch it
        (tmp_path / "loose.yaml").write_text("name: loose\ntrain:\n  max_grad_norm: 1000.0\n")
        common += ["--config", str(tmp_path / "loose.yaml")]
    peers.start("a", *common)
    addrs = peers.addrs("a")
    peers.start("b", *common, initial_peers=addrs)
    peers.start("x", *common, initial_peers=addrs, program=[*EVIL, mode])
    for name in "ab":
        assert peers.wait(name, 300) == 0, peers.log(name)[-3000:]
    ids = {name: identity_of(peers.base / name, transport) for name in "abx"}
    ma, mb = (metrics(peers.base / n / "metrics.jsonl") for n in "ab")
    assert [m["round"] for m in ma] == list(range(1, ROUNDS + 1)) == [m["round"] for m in mb]

    for m1, m2 in zip(ma, mb):
        assert m1["adapter_sha256"] == m2["adapter_sha256"]
        assert m1["members"] == m2["members"] == sorted([ids["a"], ids["b"]])  # x never in an applied round
        assert m1["sum_checksum"] == m2["sum_checksum"] == add_checksums([m1["contribution_checksum"],
                                                                            m2["contribution_checksum"]])
        assert m1["group_tokens"] == m1["tokens"] + m2["tokens"]
        assert m1["excluded"] == m2["excluded"] == [ids["x"]]

    # round 1 planned x in, and rejected it; both honest peers name it, with their own reducer's reason
    for name in "ab":
        log = peers.log(name)
        assert f"rejected the contribution of peer {ids['x']}: " in log, log[-3000:]
        line = next(ln for ln in log.splitlines() if f"rejected the contribution of peer {ids['x']}" in ln)
        assert REASONS[mode] in line, line
        assert "Traceback" not in log
    assert ma[0]["group_size"] == 2 and ma[0]["quota_tokens"] < ma[-1]["quota_tokens"]  # later plans leave x out
    assert not (peers.base / "x" / "metrics.jsonl").exists() or not metrics(peers.base / "x" / "metrics.jsonl")


def test_oversized_message_is_refused_before_it_is_read(peers):
    """A stream message announcing 1 TiB to a real peer's all-reduce handler is refused right after its
    8-byte length: the peer closes the stream, logs the refusal, keeps running, and never buffers it."""
    import asyncio

    from swarm.transport.hivemind_dht import MAX_MESSAGE_BYTES

    from hivemind.p2p import P2P, PeerID

    peers.start("a", "--max-rounds", "3", "--min-peers", "2")  # waits for a second peer: idle, handlers up
    addrs = peers.addrs("a")
    end = time.monotonic() + 120
    while "waiting for 2 peers" not in peers.log("a"):
        assert time.monotonic() < end and peers.procs["a"].poll() is None, peers.log("a")[-2000:]
        time.sleep(0.3)
    announced, sent_before_refusal = 1 << 40, 0

    async def attack() -> bool:
        nonlocal sent_before_refusal
        p2p = await P2P.create(initial_peers=addrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False,
                               use_relay=False, auto_nat=False)
        try:
            target = PeerID.from_base58(addrs[0].rsplit("/p2p/", 1)[1])
            _, reader, writer = await p2p.call_binary_stream_handler(target, "default_avg::SwarmAverager.rpc_aggregate_part")
            writer.write(P2P.MESSAGE_MARKER + announced.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
            chunk = b"\0" * (1 << 20)
            try:
                for _ in range(256):  # at most 256 MiB, bounded in time too
                    writer.write(chunk)
                    await asyncio.wait_for(writer.drain(), 10)
                    sent_before_refusal += len(chunk)
                    if reader.at_eof() or writer.is_closing():
                        return True
                return False
            except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                return True
        finally:
            await p2p.shutdown()

    refused = asyncio.run(asyncio.wait_for(attack(), 120))
    assert refused, "the peer kept reading a message announced as 1 TiB"
    assert sent_before_refusal < 8 * MAX_MESSAGE_BYTES
    network = (peers.base / "a" / "network.log").read_text()
    assert f"refused a {announced}-byte message (limit {MAX_MESSAGE_BYTES} bytes) before reading it" in network
    assert peers.procs["a"].poll() is None  # still serving


@pytest.mark.parametrize("mode", ["state", "optstate", "slowstate", "future"])
def test_poisoned_state_is_rejected_and_the_joiner_downloads_the_swarms(peers, mode):
    """x trains honestly but serves joiners, at top priority, a poisoned adapter with a self-consistent hash
    (`state`), the swarm's adapter with poisoned optimizer moments that pass every invariant (`optstate`,
    scenario 8), a stream that never ends in time (`slowstate`, scenario 7), or the swarm's state relabelled as a
    far-future round nobody vouches for (`future`, scenario 2): the late joiner c rejects or
    skips it if it asks x, never downloads that state from x again, takes a's state, and ends identical to a."""
    rounds = 24  # long enough for c to start up (~15 s on a busy 2-core machine) while the swarm trains
    common = ["--max-rounds", str(rounds), "--min-peers", "2"]
    peers.start("a", *common)
    addrs = peers.addrs("a")
    peers.start("x", *common, initial_peers=addrs, program=[*EVIL, mode])
    end = time.monotonic() + 240
    while len(metrics(peers.base / "a" / "metrics.jsonl")) < 2:
        assert time.monotonic() < end and peers.procs["a"].poll() is None, peers.log("a")[-3000:]
        time.sleep(0.3)
    peers.start("c", "--max-rounds", str(rounds), initial_peers=addrs)
    for name in "acx":
        assert peers.wait(name, 300) == 0, peers.log(name)[-3000:]
    log = peers.log("c")
    # declared priorities are unsigned, so sources are asked in random order: c may never have asked x; if it did,
    # it rejected x's state and named x
    rejected = [ln for ln in log.splitlines() if "rejected state of round" in ln]
    assert all("is not what the swarm's peers report; not downloading from it again" in ln for ln in rejected), log[-3000:]
    assert "downloaded state of round" in log
    ma, mc = (metrics(peers.base / n / "metrics.jsonl") for n in "ac")
    assert mc and ma[-1]["round"] == mc[-1]["round"] == rounds
    assert ma[-1]["adapter_sha256"] == mc[-1]["adapter_sha256"]


def test_lure_run_naming_a_local_path_is_never_opened(peers, tmp_path, monkeypatch):
    """Issue 18's "lure": a stranger publishes a copy of the run, one parameter larger, whose data.source
    and model.path name a local file. A joiner started as the README shows (no --config) must not pick
    it, must never open that file, and must train the honest run without a traceback."""
    import os

    canary = tmp_path / "private" / "secret.txt"
    canary.parent.mkdir()
    canary.write_text("private diary\n" * 100)
    old = time.time() - 3 * 86400
    os.utime(canary, (old, old))  # relatime updates an atime older than a day on any read
    monkeypatch.setenv("SWARM_LURE_PATH", str(canary))
    # the honest swarm outlives the joiner whatever the machine's load (the joiner downloads round 2's state, or a later
    # one, and leaves); the fixture stops it
    peers.start("a", "--max-rounds", "40", "--min-peers", "2")
    addrs = peers.addrs("a")
    peers.start("x", "--max-rounds", "40", initial_peers=addrs, program=[*EVIL, "lure"])
    deadline = time.monotonic() + 120
    while "joining run" not in peers.log("x") and time.monotonic() < deadline:  # x has published the lure
        time.sleep(0.5)
    time.sleep(3)
    peers.start("j", "--max-rounds", "2", initial_peers=addrs)
    assert peers.wait("j", 300) == 0, peers.log("j")[-3000:]
    log = peers.log("j")
    assert "ignoring run 'lure': its record names local paths" in log, log[-3000:]
    assert "Traceback" not in log
    assert "joining run 'default'" in log  # the honest run (it may end by downloading round 2's state)
    control = tmp_path / "control.txt"
    control.write_text("x")
    os.utime(control, (old, old))
    control.read_text()
    if os.stat(control).st_atime != old:  # this filesystem records reads (not mounted noatime)
        assert os.stat(canary).st_atime == old  # never opened


def test_an_older_run_record_never_stops_running_peers(peers):
    """Scenario 5 of the security review: x keeps writing an older record (created 0) of the run with another
    fingerprint; a and b keep the run they joined, train every round together and exit 0."""
    common = ["--max-rounds", "4", "--min-peers", "3"]
    peers.start("a", *common)
    addrs = peers.addrs("a")
    peers.start("b", *common, initial_peers=addrs)
    end = time.monotonic() + 120
    while "waiting before round 1" not in peers.log("b"):  # b joined the run before the lure is written
        assert time.monotonic() < end and peers.procs["b"].poll() is None, peers.log("b")[-2000:]
        time.sleep(0.3)
    peers.start("x", *common, initial_peers=addrs, program=[*EVIL, "oldrun"])
    for name in "ab":
        assert peers.wait(name, 300) == 0, peers.log(name)[-3000:]
    ma, mb = (metrics(peers.base / n / "metrics.jsonl") for n in "ab")
    # both reach round 4 on the run they joined; on a loaded machine one may take a round by download (a round the
    # other committed while it was slow), which writes no row for it: never more than one
    for m in (ma, mb):
        assert m[-1]["round"] == 4 and len({r["round"] for r in m}) >= 3, (ma, mb)
    common = {r["round"]: r["adapter_sha256"] for r in ma}
    assert all(common[r["round"]] == r["adapter_sha256"] for r in mb if r["round"] in common)
    assert ma[-1]["adapter_sha256"] == mb[-1]["adapter_sha256"]
    assert any("keeps the run it joined" in peers.log(n) for n in "ab")


def _honest_pair(peers, mode: str, rounds: int = 3, min_peers: int = 3):
    """a and b (honest) train `rounds` rounds with x (scripts/hostile_peer.py MODE): both exit 0, commit every round
    with the same adapter, and never a traceback. Returns (a's metrics, b's metrics, ids)."""
    from swarm.transport.hivemind_dht import peer_id_of

    common = ["--max-rounds", str(rounds), "--min-peers", str(min_peers)]
    peers.start("a", *common)
    addrs = peers.addrs("a")
    peers.start("b", *common, initial_peers=addrs)
    peers.start("x", *common, initial_peers=addrs, program=[*EVIL, mode])
    for name in "ab":
        assert peers.wait(name, 300) == 0, peers.log(name)[-3000:]
        assert "Traceback" not in peers.log(name)
    ma, mb = (metrics(peers.base / n / "metrics.jsonl") for n in "ab")
    assert [m["round"] for m in ma] == list(range(1, rounds + 1)) == [m["round"] for m in mb]
    assert [m["adapter_sha256"] for m in ma] == [m["adapter_sha256"] for m in mb]
    return ma, mb, {n: peer_id_of(peers.base / n / "identity.key") for n in "abx"}


def test_a_reducer_handing_every_member_the_same_wrong_result_is_caught_before_commit(peers):
    """Scenario 1, the same wrong result for everyone: every member's result hashes agree, so only the value check
    (swarm.verify's sketches of the members' contributions) can see it. No round with x is ever committed, x is
    named, and every committed round applied exactly the sum of the honest contributions."""
    from swarm.averaging import add_checksums

    ma, mb, ids = _honest_pair(peers, "samewrong")
    for m1, m2 in zip(ma, mb):
        assert m1["members"] == m2["members"] == sorted([ids["a"], ids["b"]])  # x's span was never committed
        assert m1["sum_checksum"] == m2["sum_checksum"] == add_checksums([m1["contribution_checksum"],
                                                                            m2["contribution_checksum"]])
    named = [n for n in "ab" if "not the sum of the members' contributions" in (peers.base / n / "network.log").read_text()]
    assert named, peers.log("a")[-3000:] + peers.log("b")[-3000:]
    for n in named:
        assert f"reducer(s) {ids['x']} handed every member a result that is not the sum" in \
            (peers.base / n / "network.log").read_text()


def test_a_peer_outside_the_plan_is_refused_from_the_group(peers):
    """Scenario 6: x is in nobody's plan (it advertises paused) but joins every round's group with a plan of its
    own: it is refused before any part moves (named in the log), and never in a group the honest peers apply."""
    ma, mb, ids = _honest_pair(peers, "outsider", min_peers=2)
    assert all(m["members"] == sorted([ids["a"], ids["b"]]) for m in ma + mb)
    network = "".join((peers.base / n / "network.log").read_text() for n in "ab")
    if ids["x"] in network:  # it reached an honest peer's matchmaking: refused, and why
        assert "this round's plan" in network


def test_a_claimed_speed_cannot_take_the_round(peers):
    """Scenario 6: x advertises and shares 1e9 tokens/s; the plans give it at most SPEED_RATIO x the median peer's
    share (not ~96 % of the round)."""
    from swarm.planner import SPEED_RATIO

    ma, mb, ids = _honest_pair(peers, "speed")
    mx = metrics(peers.base / "x" / "metrics.jsonl")
    for a, b, x in zip(ma, mb, mx):
        total = a["quota_tokens"] + b["quota_tokens"] + x["quota_tokens"]
        assert x["quota_tokens"] / total < SPEED_RATIO / (SPEED_RATIO + 2) + 0.05, (a, b, x)


def test_sybil_votes_do_not_make_honest_peers_catch_up(peers):
    """Scenario 3: x writes progress records of 6 fresh identities reporting another state for every round; a and b
    count only members of their groups, so they never think their state is the minority's."""
    ma, mb, ids = _honest_pair(peers, "sybil")
    for n in "ab":
        assert "differs from the swarm's" not in peers.log(n)


def test_a_reducer_handing_out_different_results_is_caught_before_commit(peers):
    """Scenario 1: x, as a reducer, hands one member a different averaged span. The members' signed result hashes
    differ: nobody commits that round's result, x is named as the reducer, and the honest peers end identical."""
    ma, mb, ids = _honest_pair(peers, "reducer")
    # who can name x: a member whose own decode passed and that saw another member's differing hashes. The other
    # honest member may have failed that attempt earlier (a check-lane failure names no one: a reducer that lost a
    # part looks the same), so it may not ban x; the two then plan round 2 differently until the one that banned x
    # plans it in again (Peer._plans_differ): both still commit every round, identically (_honest_pair)
    named = [n for n in "ab" if f"rejected the contribution of peer {ids['x']}: handed members different results"
             in peers.log(n)]
    assert named, peers.log("a")[-3000:] + peers.log("b")[-3000:]
    for n in named:
        assert f"reducer(s) {ids['x']} handed members different results" in (peers.base / n / "network.log").read_text()
    assert ma[-1]["members"] == sorted([ids["a"], ids["b"]])
