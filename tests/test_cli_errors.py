"""Bad input: one clear line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import socket

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow
UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWCwVBHSkcPC31VDFW1RDnDBfmL5xZrC2STbKJfN3fFndM"


def _one_line_error(res, *needles):
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr + res.stdout
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _join(tmp_path, *args):
    return run_cli("swarm.join", "--host", "127.0.0.1", "--output", str(tmp_path / "out"), *args, timeout=120)


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  learning_rate: 0.1\n")
    _one_line_error(_join(tmp_path, "--config", str(cfg)), "train.learning_rate", "unknown key")


def test_missing_model_path(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path / 'no-such-model'}\n")
    _one_line_error(_join(tmp_path, "--config", str(cfg)), "no-such-model")


@pytest.mark.parametrize("addr", ["garbage", "/ip4/127.0.0.1/tcp/31337", "/ip4/300.1.1.1/tcp/1/p2p/x"])
def test_malformed_initial_peers(tmp_path, addr):
    _one_line_error(_join(tmp_path, "--initial-peers", addr), "--initial-peers")


def test_unreachable_initial_peers(tmp_path):
    _one_line_error(_join(tmp_path, "--initial-peers", UNREACHABLE), "could not reach", UNREACHABLE)


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _one_line_error(_join(tmp_path, "--port", str(port)), "port", "in use")


def test_bad_numbers(tmp_path):
    res = _join(tmp_path, "--max-utilization", "1.5")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--max-utilization" in res.stderr


def test_base_model_differs_from_the_swarms(peers, tmp_path):
    peers.start("a", "--min-peers", "9", "--max-rounds", "1")  # waits for peers that never come
    addrs = peers.addrs("a")
    cfg = tmp_path / "other-base.yaml"
    cfg.write_text("model:\n  builtin:\n    seed: 1\n")  # same run name, different base weights
    line = _one_line_error(_join(tmp_path, "--config", str(cfg), "--initial-peers", *addrs), "base model differs")
    assert "default" in line
