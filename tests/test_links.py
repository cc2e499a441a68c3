"""Emulated consumer links (swarm.links, `swarm.testbed --link`): the spec parser, the link arithmetic,
real transfers through the relay, and a real testbed behind links."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import pytest

from swarm import SwarmError
from swarm.links import Link, LinkEmulator, LinkSpec, free_port, parse_links, schedule_path
from tests.conftest import ROOT, run_cli

sys.path.insert(0, str(ROOT / "scripts"))


@pytest.mark.parametrize("text, up, down, rtt", [
    ("20mbit/100mbit/40ms", 20e6, 100e6, 0.04),
    ("1gbit/1Gbit/0ms", 1e9, 1e9, 0.0),
    ("512kbit/2.5mbit/0.1s", 512e3, 2.5e6, 0.1),
    (" 10MBIT / 50mbit / 250us ", 10e6, 50e6, 250e-6),
])
def test_spec_parses(text, up, down, rtt):
    spec = LinkSpec.parse(text)
    assert (spec.up_bps, spec.down_bps) == (up, down) and spec.rtt == pytest.approx(rtt)
    assert LinkSpec.parse(str(spec)) == spec  # prints as it parses


@pytest.mark.parametrize("text, why", [
    ("20mbit/100mbit", "expected UP/DOWN/RTT"),
    ("20mbps/100mbit/40ms", "rate '20mbps' is not understood"),
    ("20/100mbit/40ms", "rate '20' is not understood"),
    ("20mbit/100mbit/40", "RTT '40' is not understood"),
    ("0mbit/100mbit/40ms", "rates must be positive"),
    ("20mbit/100mbit/-4ms", "RTT '-4ms' is not understood"),
    ("20mbit/100mbit/11s", "above 10s"),
    ("20mbit/100mbit/40ms/1", "expected UP/DOWN/RTT"),
])
def test_bad_spec_is_one_clear_line(text, why):
    with pytest.raises(SwarmError) as e:
        LinkSpec.parse(text)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_comma_list_gives_each_peer_its_own():
    assert [str(s) for s in parse_links("20mbit/100mbit/40ms,10mbit/50mbit/80ms", 2)] == \
        ["20mbit/100mbit/40ms", "10mbit/50mbit/80ms"]
    assert len(set(parse_links("20mbit/100mbit/40ms", 3))) == 1
    with pytest.raises(SwarmError, match="2 links for 3 peers"):
        parse_links("20mbit/100mbit/40ms,10mbit/50mbit/80ms", 3)


def test_link_is_a_fifo_serializer_then_a_delay():
    link = Link(8e6, 0.02)                        # 1 MB/s, 20 ms one way
    assert link.schedule(1000, 0.0) == pytest.approx((0.001, 0.021))
    assert link.schedule(1000, 0.0) == pytest.approx((0.002, 0.022))   # queued behind the first
    assert link.schedule(1000, 1.0) == pytest.approx((1.001, 1.021))   # idle line: no queue
    up, down = Link(8e6, 0.02), Link(80e6, 0.01)  # a path crosses the sender's uplink, then the receiver's downlink
    queued, arrive = schedule_path([up, down], 10_000, 0.0)
    assert queued == 0.0 and arrive == pytest.approx(0.01 + 0.02 + 0.001 + 0.01)
    queued, _ = schedule_path([up, down], 10_000, 0.0)
    assert queued == pytest.approx(0.01)          # behind the first 10 kB on the slow uplink


def test_real_transfers_get_the_set_rate_and_rtt():
    """Through the relay the testbed uses (loose bounds: the machine may be busy; scripts/bench_links.py measures)."""
    import bench_links as bench

    async def run():
        emulator, a_spec, b_spec = LinkEmulator(), LinkSpec.parse("16mbit/40mbit/40ms"), LinkSpec.parse("8mbit/80mbit/20ms")
        ports = [free_port(), free_port()]
        relays = [emulator.add_peer(a_spec, ports[0]), emulator.add_peer(b_spec, ports[1])]
        servers = [await asyncio.start_server(bench.handle, sock=bench.listener(p)) for p in ports]
        emulator.start()
        try:
            out = {"rtt": await bench.rtt(relays[0], None), "up": await bench.upload(relays[0], None, 1_000_000),
                   "p2p_rtt": await bench.rtt(relays[0], ports[1]),
                   "p2p": await bench.download(relays[0], ports[1], 500_000)}  # b -> a: b's 8 Mbit/s uplink
        finally:
            emulator.stop()
            for s in servers:
                s.close()
        return out, emulator

    out, emulator = asyncio.run(run())
    assert 0.04 <= out["rtt"] < 0.06, out
    assert 0.8 < out["up"] / 16e6 < 1.15, out
    assert 0.06 <= out["p2p_rtt"] < 0.08, out                     # both lines' RTTs
    assert 0.8 < out["p2p"] / 8e6 < 1.15, out
    assert emulator.connections == 4 and emulator.unidentified == 2  # the dials from peer b's port were recognised
    assert emulator.stats()[1]["bytes_up"] >= 500_000


def test_bad_link_flag_exits_2_with_one_line():
    res = run_cli("swarm.testbed", "--peers", "2", "--link", "20mbit/100mbit", timeout=60)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "UP/DOWN/RTT" in res.stderr, res.stderr
    res = run_cli("swarm.join", "--announce", "/ip4/127.0.0.1/tcp/0", timeout=60)
    assert res.returncode == 2 and "explicit port" in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.slow
def test_testbed_behind_links_trains_identical_adapters(tmp_path):
    out = tmp_path / "bed"
    res = run_cli("swarm.testbed", "--peers", "2", "--max-rounds", "2", "--output", str(out),
                  "--link", "20mbit/100mbit/40ms,10mbit/50mbit/20ms", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["all_adapters_identical"]
    assert [line["link"] for line in summary["links"]] == ["20mbit/100mbit/40ms", "10mbit/50mbit/20ms"]
    assert summary["link_connections"] >= 1 and summary["link_unidentified"] == 0  # every dial crossed both lines
    a, b = summary["links"]
    assert a["bytes_up"] == b["bytes_down"] and b["bytes_up"] == a["bytes_down"]  # all traffic went through the relays
    rows = [[json.loads(line) for line in (out / f"peer{k}" / "metrics.jsonl").read_text().splitlines()] for k in range(2)]
    assert [r["adapter_sha256"] for r in rows[0]] == [r["adapter_sha256"] for r in rows[1]] and len(rows[0]) == 2
    # traffic and time metrics: a 2-peer butterfly sends half the float64 vector as parts and returns the other half
    # as averaged deltas, so each peer sends (and receives) the vector's size once, plus framing and matchmaking
    from swarm.averaging import vector_size

    params = int(re.search(r"(\d+) LoRA params", (out / "peer0" / "log.txt").read_text()).group(1))
    expected = 8 * vector_size(params) * 2 * (2 - 1) / 2
    for k, peer_rows in enumerate(rows):
        for r in peer_rows:
            assert {"bytes_sent", "bytes_received", "compute_seconds", "comm_seconds"} <= set(r)
            for field in ("bytes_sent", "bytes_received"):
                assert 1.0 < r[field] / expected < 1.05, (field, r[field], expected)
            assert 0 < r["compute_seconds"] <= r["train_seconds"] and 0 < r["comm_seconds"] <= r["wait_seconds"]
            # at least the transfer time over the slower uplink (10 Mbit/s), whatever else the round did
            assert r["comm_seconds"] > r["bytes_sent"] * 8 / 10e6
        line = summary["links"][k]  # the relay saw every byte of the averaging traffic, and the DHT's and libp2p's
        assert sum(r["bytes_sent"] for r in peer_rows) < line["bytes_up"]
        assert sum(r["bytes_received"] for r in peer_rows) < line["bytes_down"]
