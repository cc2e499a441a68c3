"""Capability adverts from other peers are untrusted: good ones pass, anything else is a RecordError."""

from __future__ import annotations

import math

import pytest

from swarm.records import ADVERT_VERSION, CapabilityAdvert, RecordError, parse_advert

GB = 1 << 30


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path / "cache"))


def good(**changes) -> dict:
    raw = {
        "version": 1, "peer_id": "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "run": "default",
        "backend": "mlx", "device": "Apple M2 Pro", "tier": "sweet-spot",
        "memory_total_bytes": 32 * GB, "memory_usable_bytes": 24 * GB, "throughput_tokens_per_s": 812.5,
        "max_utilization": 0.5, "max_micro_batch": 8, "start_round": 3, "paused": False, "timestamp": 1.76e9,
    }
    raw.update(changes)
    return raw


def test_good_advert_round_trips():
    a = parse_advert(good())
    assert isinstance(a, CapabilityAdvert) and a.version == ADVERT_VERSION
    assert a.memory_usable_bytes == 24 * GB and a.tier == "sweet-spot"
    assert parse_advert(a.to_wire()) == a


def test_defaults_fill_optional_fields():
    raw = good()
    for k in ("max_utilization", "start_round", "paused"):
        raw.pop(k)
    a = parse_advert(raw)
    assert (a.max_utilization, a.start_round, a.paused) == (1.0, 0, False)


def test_an_advert_from_detect_is_valid():
    """What this machine would publish passes its own validation (tier names fit the schema)."""
    from swarm.hardware import TIERS, detect

    hw = detect()
    a = parse_advert(good(backend=hw.backend, device=hw.device[:200], tier=hw.tier,
                          memory_total_bytes=hw.memory_total_bytes, memory_usable_bytes=hw.memory_usable_bytes))
    assert a.tier in TIERS
    for tier in TIERS:
        parse_advert(good(tier=tier))


# --------------------------------------------------------------------------------- versions


def test_future_version_with_extra_fields_is_rejected():
    with pytest.raises(RecordError, match="unsupported version 2"):
        parse_advert(good(version=2, gpu_count=4, interconnect="nvlink"))


def test_version_1_with_an_unknown_field_is_accepted_and_the_field_ignored():
    a = parse_advert(good(gpu_count=4, note={"nested": [1, 2]}))
    assert not hasattr(a, "gpu_count") and "gpu_count" not in a.to_wire()


@pytest.mark.parametrize("version", [None, 0, "1", 1.0, True, [1]])
def test_versions_that_only_look_like_1_are_rejected(version):
    raw = good(version=version) if version is not None else {k: v for k, v in good().items() if k != "version"}
    with pytest.raises(RecordError, match="version"):
        parse_advert(raw)


# ----------------------------------------------------------------------------------- forged


@pytest.mark.parametrize("field, value, why", [
    ("memory_usable_bytes", 40 * GB, "usable memory exceeds total"),      # claims more usable than it has
    ("backend", "tpu", "backend"),                                         # a backend no peer runs
    ("tier", "platinum\x1b[31m", "tier"),                                  # tier outside the naming scheme
    ("device", "RTX 4090\x1b[2J\x1b[H", "control characters"),              # terminal escapes for the status table
    ("peer_id", "", "peer_id"),
    ("run", "r" * 65, "run"),
    ("max_utilization", 1.5, "max_utilization"),                           # more than all of its time
    ("max_utilization", 0.0, "max_utilization"),
    ("timestamp", 1e30, "timestamp"),                                      # written in the far future
])
def test_forged_fields_are_rejected(field, value, why):
    with pytest.raises(RecordError, match=why):
        parse_advert(good(**{field: value}))


def test_an_advert_naming_another_peer_never_reaches_the_planner():
    """Signatures are the transport's job; membership also drops records whose peer_id is not their signer."""
    from swarm.membership import Membership, adverts_key
    from swarm.transport.base import Record

    mine, theirs = good(peer_id="QmMallory"), good(peer_id="QmAlice")
    records = [Record(owner="QmMallory", value=mine, expiration=0.0),
               Record(owner="QmMallory", value=theirs, expiration=0.0),   # Mallory writes as Alice
               Record(owner="QmBob", value=good(peer_id="QmBob", throughput_tokens_per_s=math.nan), expiration=0.0)]

    class FakeTransport:
        def get(self, key):
            assert key == adverts_key("default")
            return records

    members = Membership(FakeTransport())
    assert [a.peer_id for a in members.adverts("default")] == ["QmMallory"]
    assert "QmBob" in members.rejected


# -------------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("field, value", [
    ("memory_total_bytes", "34359738368"),   # a string is not a number
    ("memory_total_bytes", 3.2e10),          # nor is a float an integer
    ("memory_total_bytes", True),
    ("max_micro_batch", 8.0),
    ("throughput_tokens_per_s", "fast"),
    ("throughput_tokens_per_s", True),
    ("paused", 1),
    ("peer_id", 12345),
    ("device", None),
    ("start_round", [3]),
])
def test_wrong_types_are_rejected(field, value):
    with pytest.raises(RecordError, match=field):
        parse_advert(good(**{field: value}))


@pytest.mark.parametrize("field, value", [
    ("memory_total_bytes", -1),
    ("memory_usable_bytes", -GB),
    ("throughput_tokens_per_s", -5.0),
    ("throughput_tokens_per_s", math.nan),
    ("throughput_tokens_per_s", math.inf),
    ("timestamp", math.nan),
    ("timestamp", -1.0),
    ("max_micro_batch", -1),
    ("start_round", -1),
])
def test_negative_and_non_finite_values_are_rejected(field, value):
    with pytest.raises(RecordError, match=field):
        parse_advert(good(**{field: value}))


@pytest.mark.parametrize("field, value", [
    ("memory_total_bytes", 1 << 62),
    ("throughput_tokens_per_s", 1e15),
    ("max_micro_batch", 1 << 40),
    ("start_round", 1 << 60),
    ("device", "x" * 10_000),
    ("peer_id", "Q" * 1000),
])
def test_huge_values_are_rejected(field, value):
    changes = {field: value}
    if field == "memory_total_bytes":
        changes["memory_usable_bytes"] = 0
    with pytest.raises(RecordError, match=field):
        parse_advert(good(**changes))


@pytest.mark.parametrize("raw", [None, [], "advert", 7, b"\x00", [("version", 1)]])
def test_non_mappings_are_rejected(raw):
    with pytest.raises(RecordError, match="expected a mapping"):
        parse_advert(raw)


def test_missing_required_field_is_rejected():
    raw = good()
    del raw["memory_usable_bytes"]
    with pytest.raises(RecordError, match="memory_usable_bytes"):
        parse_advert(raw)


def test_errors_are_one_line():
    with pytest.raises(RecordError) as e:
        parse_advert(good(memory_total_bytes="lots", throughput_tokens_per_s=math.nan))
    assert "\n" not in str(e.value)
