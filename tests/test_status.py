"""swarm.status's table in an 80-column terminal or pipe, and the dashboard's pure parts (history, routes).
The dashboard in a real browser against a live swarm is tests/test_dashboard.py."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from swarm.dashboard import Dashboard, DashboardSettings, LossHistory
from swarm.status import render


def _peer(i: int, **kw) -> dict:
    p = {"peer_id": f"{i}f4feaf42c96768abcdef", "tier": "sweet-spot", "backend": "cuda", "device": "RTX 4090",
         "precision": None, "memory_usable_bytes": 21.3e9, "memory_total_bytes": 24e9, "tokens_per_s": 12345.6,
         "max_utilization": 0.5, "max_micro_batch": 8, "micro_batch": 8, "quota_tokens": 123456 + i, "round": 1234,
         "last_seen_s": 12.3, "state": "training", "loss": 5.12345 + i, "why": None}
    p.update(kw)
    return p


def _snapshot(peers) -> dict:
    return {"time": 1.0, "runs": [{"name": "default", "model": "builtin", "params": 3.3e6, "base_sha256": "x" * 64,
                                   "fingerprint": "f", "round": 1234, "plan": {"plan_id": "1801ae9b0d96"}, "peers": peers}]}


def _text(snapshot, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), force_terminal=False)
    render(snapshot, console)
    return console.file.getvalue()


def test_the_table_is_readable_in_80_columns():
    peers = [_peer(i) for i in range(3)] + [_peer(9, tier="-", backend="-", state="banned", last_seen_s=None, loss=None)]
    text = _text(_snapshot(peers), 80)
    assert "…" not in text and max(map(len, text.splitlines())) <= 80, text
    for p in peers[:3]:
        row = next(line for line in text.splitlines() if line.startswith(p["peer_id"][:8]))
        for cell in ("sweet-spot", "cuda", "21.3G", str(p["quota_tokens"]), f"{p['loss']:.4f}", "training"):
            assert cell in row, (cell, row)
    assert "banned" in text
    wide = _text(_snapshot(peers), 160)
    assert "util" in wide and "0.50" in wide and "not shown" not in wide


def test_precision_shows_with_the_backend():
    assert "cuda/bf16" in _text(_snapshot([_peer(0, precision="bf16")]), 80)


def test_loss_history_keeps_each_peers_curve_bounded():
    h = LossHistory()
    for r in (1, 2, 2, 3):
        h.add(_snapshot([_peer(0, round=r, loss=5.0 - r), _peer(1, round=r, loss=None)]))
    assert h.to_dict() == {"default": {_peer(0)["peer_id"]: [(1, 4.0), (2, 3.0), (3, 2.0)]}}


def test_routes_serve_the_page_and_the_status_json():
    d = Dashboard(lambda: {}, DashboardSettings(port=0))
    d.snapshot = _snapshot([_peer(0)])
    status, ctype, body, extra = d.route("GET", "/")
    assert status == "200 OK" and b"/api/swarm" in body and "script-src 'sha256-" in extra["Content-Security-Policy"]
    status, ctype, body, _ = d.route("GET", "/api/swarm?x=1")
    assert ctype == "application/json" and json.loads(body) == d.snapshot
    assert d.route("POST", "/")[0].startswith("405") and d.route("GET", "/etc/passwd")[0].startswith("404")


@pytest.mark.parametrize("args, message", [
    (["--serve", "--port", "70000"], "--port 70000 is not in 0..65535"),
    (["--serve", "--refresh", "0"], "--refresh 0.0 is not in"),
    (["--serve", "--json"], "do not go together"),
])
def test_bad_dashboard_flags_are_one_line_and_exit_2(args, message, capsys):
    from swarm.status import main

    addr = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWPGXzYchjfHPfcNLXhFfvUDfRSzKdePoBwdCMxybtSbH3"
    with pytest.raises(SystemExit) as e:
        main(["--initial-peers", addr, *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_an_excluded_peer_shows_why_under_the_table():
    why = "fits no allowed option: micro-batch 1 needs 2.50 GB as nf4 with gradient checkpointing, it has 2.00 GB usable"
    text = _text(_snapshot([_peer(0), _peer(1, state="excluded", excluded="does_not_fit", why=why, quota_tokens=0)]), 80)
    assert f"{_peer(1)['peer_id'][:8]} excluded: {why}" in " ".join(text.split()), text
    row = next(line for line in text.splitlines() if line.startswith(_peer(1)["peer_id"][:8]))
    assert "excluded" in row
