"""`--transport hivemind|tcp` (swarm.transport.factory): flags, settings, the run record, and what a peer of the
other transport sees (one line naming --transport, exit 2; never a traceback or a hang)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

from conftest import metrics, run_cli
from swarm import SwarmError
from swarm.config import default_run
from swarm.membership import Membership
from swarm.records import RunRecord, parse_run
from swarm.settings import PeerSettings
from swarm.transport.factory import IDENTITY_FILES, address_mismatch, make_transport

LOCAL = "127.0.0.1"
QM = "/ip4/127.0.0.1/tcp/9/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # an RSA-style libp2p id (not Ed25519)
ED = "/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWCwVBHSkcPC31VDFW1RDnDBfmL5xZrC2STbKJfN3fFndM"


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _record(**kw) -> RunRecord:
    return RunRecord(name="default", protocol=1, fingerprint="f" * 16, base_sha256="0" * 64, model="m", params=1,
                     config={}, created=1.0, **kw)


def test_flag_defaults_to_hivemind_and_reaches_the_settings():
    from swarm.join import parse_args

    assert PeerSettings.from_args(parse_args([])).transport == "hivemind"
    assert PeerSettings.from_args(parse_args(["--transport", "tcp"])).transport == "tcp"
    assert IDENTITY_FILES == {"hivemind": "identity.key", "tcp": "identity.ed25519"}


@pytest.mark.parametrize("module", ["swarm.join", "swarm.status", "swarm.testbed"])
def test_unknown_transport_is_a_one_line_usage_error(module, capsys):
    main = __import__(module, fromlist=["main"]).main if module != "swarm.testbed" else None
    argv = ["--transport", "quic"] + (["--initial-peers", QM] if module == "swarm.status" else [])
    with pytest.raises(SystemExit) as e:
        if main is not None:
            main(argv)
        else:
            from swarm.testbed import parse_args
            parse_args(argv)
    assert e.value.code == 2
    assert "--transport" in _one_line(capsys.readouterr().err)


def test_testbed_passes_the_transport_to_every_peer(tmp_path):
    from swarm.testbed import Testbed, parse_args

    bed = Testbed(parse_args(["--transport", "tcp", "--peers", "2", "--output", str(tmp_path)]))
    for k, peers in ((0, None), (1, ["/ip4/127.0.0.1/tcp/1/p2p/x"])):
        cmd = bed.command(k, peers)
        assert cmd[cmd.index("--transport") + 1] == "tcp"
    assert "--transport" not in Testbed(parse_args(["--output", str(tmp_path)])).command(0, None)


def test_a_hivemind_address_given_to_a_tcp_peer_names_the_flag(capsys):
    from swarm.join import parse_args

    assert address_mismatch("tcp", QM) and "--transport hivemind" in address_mismatch("tcp", QM)
    assert address_mismatch("hivemind", QM) is None
    with pytest.raises(SystemExit) as e:
        parse_args(["--transport", "tcp", "--initial-peers", QM])
    assert e.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert "--transport" in line and QM in line


def _libp2p_like_listener():
    """A listener that speaks what a libp2p peer speaks first (multistream-select), not TLS: its port."""
    srv = socket.socket()
    srv.bind((LOCAL, 0))
    srv.listen()
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"\x13/multistream/1.0.0\n")
                try:
                    conn.recv(4096)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, stop, t


def test_a_tcp_peer_dialing_a_libp2p_peer_names_the_flag():
    srv, stop, t = _libp2p_like_listener()
    try:
        addr = ED.format(port=srv.getsockname()[1])
        with pytest.raises(SwarmError, match=r"could not reach any initial peer.*same --transport"):
            make_transport("tcp", host=LOCAL, initial_peers=[addr])
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_a_hivemind_peer_dialing_a_tcp_peer_names_the_flag():
    tcp = make_transport("tcp", host=LOCAL)
    try:
        with pytest.raises(SwarmError, match=r"could not reach.*--transport tcp swarm\?"):
            make_transport("hivemind", host=LOCAL, initial_peers=tcp.visible_maddrs(), client=True)
    finally:
        tcp.shutdown()


def test_swarm_join_over_tcp_into_a_libp2p_peer_is_one_line_exit_2(tmp_path):
    srv, stop, t = _libp2p_like_listener()
    try:
        res = run_cli("swarm.join", "--transport", "tcp", "--host", LOCAL, "--output", str(tmp_path / "out"),
                      "--initial-peers", ED.format(port=srv.getsockname()[1]), timeout=120)
    finally:
        stop.set()
        t.join(5)
        srv.close()
    assert res.returncode == 2, res.stderr
    line = _one_line(res.stderr)
    assert "--transport" in line and "could not reach" in line
    assert (tmp_path / "out" / "identity.ed25519").is_file() and not (tmp_path / "out" / "identity.key").exists()


def test_run_record_names_its_transport_and_old_records_are_hivemind():
    assert _record().transport == "hivemind"
    assert _record(transport="tcp").to_wire()["transport"] == "tcp"
    old = _record().to_wire()
    del old["transport"]  # a record of a peer from before the field
    assert parse_run(old).transport == "hivemind"
    # the transport is no part of the run config: the default run's fingerprint is what it always was
    assert default_run().fingerprint() == "e13c1cfcbbeed2ce"


def test_a_joiner_of_another_transport_is_refused_in_one_line():
    from swarm.peer import Peer

    peer = Peer.__new__(Peer)
    peer.run_record = _record(transport="tcp")
    peer.settings = PeerSettings(transport="hivemind")
    peer.base_sha256, peer.fingerprint = "0" * 64, "f" * 16
    with pytest.raises(SwarmError, match=r"--transport tcp, this peer over --transport hivemind"):
        peer._check_run()
    peer.settings = PeerSettings(transport="tcp")
    peer._check_run()  # same transport, same base and fingerprint: joins


def test_status_over_tcp_reads_a_tcp_swarm(capsys):
    from swarm import status

    node = make_transport("tcp", host=LOCAL)
    try:
        Membership(node).publish_run(_record(transport="tcp"))
        assert status.main(["--transport", "tcp", "--json", "--wait", "0.5", "--initial-peers", *node.visible_maddrs()]) == 0
        snap = json.loads(capsys.readouterr().out)
        assert [(r["name"], r["transport"]) for r in snap["runs"]] == [("default", "tcp")]
    finally:
        node.shutdown()


def test_status_over_tcp_at_an_unreachable_peer_is_one_line(capsys):
    dead = ED.format(port=9)
    assert __import__("swarm.status", fromlist=["main"]).main(["--transport", "tcp", "--initial-peers", dead]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: could not reach any initial peer") and "--transport" in line


JOIN_WITHOUT_HIVEMIND = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hivemind":
            raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, Refuse())
from swarm.join import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_tcp_swarm_trains_identically_and_a_joiner_downloads_its_state(peers, capsys):
    """Real `swarm.join --transport tcp` peers in processes where hivemind cannot even be imported (as on Windows):
    a and b train every round with one adapter hash; c joins late, downloads the state over tcp and ends identical;
    `swarm.status --transport tcp` sees the run; every peer leaves with exit 0."""
    from swarm import status

    rounds = 8
    program = ["-c", JOIN_WITHOUT_HIVEMIND]
    common = ["--transport", "tcp", "--max-rounds", str(rounds)]
    peers.start("a", *common, "--min-peers", "2", program=program)
    addrs = peers.addrs("a")
    assert addrs[0].startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in addrs[0]
    peers.start("b", *common, "--min-peers", "2", initial_peers=addrs, program=program)
    end = time.monotonic() + 240
    while len(metrics(peers.base / "a" / "metrics.jsonl")) < 2:
        assert time.monotonic() < end and all(peers.procs[n].poll() is None for n in "ab"), peers.log("a") + peers.log("b")
        time.sleep(0.3)
    assert status.main(["--transport", "tcp", "--json", "--initial-peers", *addrs]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert [r["transport"] for r in snap["runs"]] == ["tcp"] and len(snap["runs"][0]["peers"]) >= 2
    peers.start("c", *common, initial_peers=addrs, program=program)
    for n in "abc":
        assert peers.wait(n, 300) == 0, peers.log(n)[-3000:]
        log = peers.log(n)
        assert "Traceback" not in log and "hivemind" not in log.lower(), log[-3000:]
        assert (peers.base / n / "identity.ed25519").is_file()
    ma, mb, mc = (metrics(peers.base / n / "metrics.jsonl") for n in "abc")
    assert [m["round"] for m in ma] == list(range(1, rounds + 1)) == [m["round"] for m in mb]
    assert [m["adapter_sha256"] for m in ma] == [m["adapter_sha256"] for m in mb]
    assert "downloaded state of round" in peers.log("c")
    if mc:  # it may have downloaded the last round's state, with no round left to train
        assert mc[-1]["round"] == rounds and mc[-1]["adapter_sha256"] == ma[-1]["adapter_sha256"]
    left = {n: re.findall(r"left after round (\d+) \(adapter (\w+)\)", peers.log(n)) for n in "ac"}
    assert left["a"] and left["a"][-1] == left["c"][-1] == (str(rounds), ma[-1]["adapter_sha256"][:12]), left
