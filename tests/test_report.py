"""swarm.report on synthetic metrics: what it reads, how it splits a round's time, what it marks, what it draws.
A real testbed's plots are checked in tests/test_swarm.py (the testbed draws them at the end of its run)."""

from __future__ import annotations

import json
import math

import pytest

from swarm import SwarmError
from swarm.report import PARTS, events, find_metrics, load_peers, main, time_split

PNG = b"\x89PNG\r\n\x1a\n"
A, B, C, D = "aaaaaaaa11", "bbbbbbbb22", "cccccccc33", "dddddddd44"


def _row(rnd: int, peer: str, *, members=(A, B, C), excluded=(), **extra) -> dict:
    row = {"round": rnd, "peer": peer, "time": 1000.0 + 3 * rnd, "seconds": 3.0, "train_seconds": 2.0, "idle_seconds": 0.5,
           "wait_seconds": 0.8, "barrier_wait_seconds": 0.3, "loss": 5.0 - 0.1 * rnd, "tokens": 100, "group_tokens": 300,
           "work": 300 * rnd, "tokens_per_s": 33.3, "quota_tokens": 100 + rnd, "micro_batch": 4, "members": list(members),
           "excluded": list(excluded), "lost_rounds": 0}
    row.update(extra)
    return row


def _write(path, rows, torn: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + ('{"round": 9, "ti' if torn else "")
    (path / "metrics.jsonl").write_text(text)


def _swarm(root, **extra):
    """Three peers; in round 3 peer C is rejected and leaves the group, in round 4 D joins."""
    groups = {1: (A, B, C), 2: (A, B, C), 3: (A, B), 4: (A, B, D)}
    for k, peer in enumerate((A, B)):
        _write(root / f"peer{k}", [_row(r, peer, members=g, excluded=(C,) if r >= 3 else (), **extra)
                                   for r, g in groups.items()], torn=True)
    _write(root / "peer2", [_row(r, C, **extra) for r in (1, 2)])


def test_finds_a_testbed_root_or_peer_directories_and_skips_a_torn_line(tmp_path):
    _swarm(tmp_path)
    assert [f.parent.name for f in find_metrics([tmp_path])] == ["peer0", "peer1", "peer2"]
    assert [f.parent.name for f in find_metrics([tmp_path / "peer1", tmp_path / "peer0"])] == ["peer1", "peer0"]
    peers = load_peers(find_metrics([tmp_path]))
    assert [(p.label, p.peer_id, len(p.rows)) for p in peers] == [("peer0", A, 4), ("peer1", B, 4), ("peer2", C, 2)]
    assert all(p.precision is None for p in peers)


def test_same_directory_names_are_told_apart_by_peer_id_and_precision_is_read(tmp_path):
    _write(tmp_path / "x" / "out", [_row(1, A, precision="bf16")])
    _write(tmp_path / "y" / "out", [_row(1, B)])
    peers = load_peers(find_metrics([tmp_path / "x" / "out", tmp_path / "y" / "out"]))
    assert [p.label for p in peers] == ["out:aaaaaaaa", "out:bbbbbbbb"]
    assert [p.precision for p in peers] == ["bf16", None]


@pytest.mark.parametrize("fields, expected", [
    ({}, {"compute": 1.5, "idle": 0.5, "waiting": 0.3, "communication": 0.5, "other": 0.2}),
    ({"idle_seconds": None}, {"compute": 2.0, "idle": 0.0, "waiting": 0.3, "communication": 0.5, "other": 0.2}),  # older rows
    ({"seconds": 1.0}, {"compute": 1.5, "idle": 0.5, "waiting": 0.3, "communication": 0.5, "other": 0.0}),  # never negative
    ({"barrier_wait_seconds": 5.0, "idle_seconds": 9.0},
     {"compute": 0.0, "idle": 2.0, "waiting": 0.8, "communication": 0.0, "other": 0.2}),
])
def test_a_rounds_time_splits_into_its_parts(fields, expected):
    row = _row(1, A, **fields)
    split = time_split(row)
    assert list(split) == list(PARTS)
    assert all(math.isclose(split[k], v, abs_tol=1e-9) for k, v in expected.items()), split
    if not fields:
        assert math.isclose(sum(split.values()), row["seconds"])


def test_events_mark_group_changes_rejections_and_forks_once_each(tmp_path):
    _swarm(tmp_path)
    _write(tmp_path / "peer3", [_row(4, D, members=(A, B, D), lost_rounds=2)])
    evs = events(load_peers(find_metrics([tmp_path])))
    assert [(e.kind, e.round, e.detail) for e in evs] == [
        ("membership", 3, "-cccccccc"), ("rejected", 3, "cccccccc"),
        ("fork", 4, "peer3 lost 2 round(s)"), ("membership", 4, "+dddddddd")]
    assert evs[0].time == pytest.approx(9.0 - 3.0 + 3.0)  # from the start of round 1 (time 1003 - 3 s)


def test_draws_every_plot_and_eval_loss_only_when_rows_have_it(tmp_path, capsys):
    _swarm(tmp_path / "run")
    assert main([str(tmp_path / "run")]) == 0
    paths = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["loss.png", "round_time.png", "plan.png", "throughput.png"]
    for p in paths:
        data = open(p, "rb").read()
        assert data.startswith(PNG) and len(data) > 10_000
    _swarm(tmp_path / "run", eval_loss=4.2, eval_round=2, precision="fp32")
    out = tmp_path / "elsewhere"
    assert main([str(tmp_path / "run" / "peer0"), str(tmp_path / "run" / "peer1"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval_loss.png", "loss.png", "plan.png", "round_time.png",
                                                     "throughput.png"]
    _swarm(tmp_path / "run")  # eval rows gone: no stale eval plot left behind
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 0
    assert not (out / "eval_loss.png").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "is not a directory"),
    (lambda d: d.mkdir(), "no metrics.jsonl in"),
    (lambda d: _write(d, [{"round": "1"}, {"loss": 3.0}]), "no completed round in"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    target = tmp_path / "d"
    make(target)
    assert main([str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_unwritable_output_is_a_swarm_error(tmp_path):
    from swarm.report import report

    _swarm(tmp_path / "run")
    (tmp_path / "file").write_text("")
    with pytest.raises(SwarmError, match="cannot write plots"):
        report([tmp_path / "run"], tmp_path / "file" / "plots")
