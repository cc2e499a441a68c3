"""Local-steps mode (DiLoCo, swarm.local_steps): the outer Nesterov step, the mode's config and state plumbing,
the LoRA factor schedule, and a real 2-peer testbed run in the mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import metrics, run_cli
from swarm.backends.base import OptimizerState
from swarm.checkpoint import StateError, TrainingState
from swarm.config import RunConfig, default_run
from swarm.local_steps import (ab_mismatch, averaging_clip, inner_split, outer_step, shared_optimizer,
                               trained_factor)


def test_outer_step_matches_a_hand_calculation_of_nesterov():
    start = {"w": np.array([1.0, -2.0], np.float32)}
    g1 = {"w": np.array([0.5, 0.25], np.float32)}
    # round 1: m = g = [0.5, 0.25]; p = p0 - lr (g + mu m) = [1, -2] - 0.5 * 1.5 * [0.5, 0.25]
    p1, m1 = outer_step(start, g1, None, lr=0.5, mu=0.5)
    np.testing.assert_array_equal(m1["w"], [0.5, 0.25])
    np.testing.assert_array_equal(p1["w"], [1.0 - 0.375, -2.0 - 0.1875])
    # round 2: m = 0.5 [0.5, 0.25] + [1, 0] = [1.25, 0.125]; p = p1 - 0.5 ([1, 0] + 0.5 m) = p1 - [0.8125, 0.03125]
    p2, m2 = outer_step(p1, {"w": np.array([1.0, 0.0], np.float32)}, m1, lr=0.5, mu=0.5)
    np.testing.assert_array_equal(m2["w"], [1.25, 0.125])
    np.testing.assert_array_equal(p2["w"], [0.625 - 0.8125, -2.1875 - 0.03125])
    assert p2["w"].dtype == np.float32 and m2["w"].dtype == np.float32


def test_outer_step_is_torch_nesterov_sgd_and_deterministic():
    import torch

    rng = np.random.default_rng(0)
    start = {"a": rng.standard_normal((4, 8)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    grads = [{k: (rng.standard_normal(v.shape) * 1e-2).astype(np.float32) for k, v in start.items()} for _ in range(4)]
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in start.items()}
    opt = torch.optim.SGD(list(params.values()), lr=0.7, momentum=0.9, nesterov=True)
    p, m = start, None
    for g in grads:
        for k in params:
            params[k].grad = torch.from_numpy(g[k].copy())
        opt.step()
        p, m = outer_step(p, g, m, lr=0.7, mu=0.9)
    for k in params:  # torch computes in float32, this step in float64: equal to float32 rounding
        np.testing.assert_allclose(p[k], params[k].detach().numpy(), rtol=1e-5, atol=1e-6)
    # the same inputs give the same bits, every time (the invariant rests on it)
    a = outer_step(start, grads[0], m, 0.7, 0.9)
    b = outer_step({k: v.copy() for k, v in start.items()}, {k: v.copy() for k, v in grads[0].items()},
                   {k: v.copy() for k, v in m.items()}, 0.7, 0.9)
    assert all(np.asarray(a[i][k]).tobytes() == np.asarray(b[i][k]).tobytes() for i in (0, 1) for k in start)


def test_inner_split_and_factor_schedule():
    assert inner_split(6, 4) == [2, 2, 1, 1] and inner_split(8, 4) == [2, 2, 2, 2] and inner_split(2, 4) == [1, 1]
    assert sum(inner_split(37, 5)) == 37
    t = RunConfig.model_validate({"train": {"local_steps": 2, "lora_factor": "alternate"}}).train
    assert [trained_factor(t, r) for r in (1, 2, 3)] == ["lora_B", "lora_A", "lora_B"]  # B first: A's gradient is 0 while B is
    assert trained_factor(RunConfig.model_validate({"train": {"local_steps": 2}}).train, 1) is None


def test_config_fields_fingerprint_and_clip():
    default = default_run()
    # H = 1 is today's mode: the fingerprint does not move, whatever the (unused) outer settings say
    assert default.fingerprint() == RunConfig.model_validate({"train": {"outer_lr": 0.3}}).fingerprint()
    local = RunConfig.model_validate({"train": {"local_steps": 4}})
    assert local.fingerprint() != default.fingerprint()
    assert local.fingerprint() != RunConfig.model_validate({"train": {"local_steps": 4, "outer_lr": 0.5}}).fingerprint()
    assert averaging_clip(default.train, 1000) == default.train.max_grad_norm
    bound = averaging_clip(local.train, 1000)  # a power of two above H AdamW steps of ~lr per value
    assert bound >= 4 * local.train.lr * 1000 ** 0.5 and bound == 2.0 ** round(np.log2(bound))
    for bad in ({"local_steps": 0}, {"outer_momentum": 1.0}, {"lora_factor": "freeze"}, {"outer_lr": 0},
                {"lora_factor": "alternate"}):
        with pytest.raises(Exception):
            RunConfig.model_validate({"train": bad})


def _state(momentum=None):
    adapter = {"m.lora_A": np.ones((2, 3), np.float32), "m.lora_B": np.zeros((3, 2), np.float32)}
    s0 = TrainingState(round=0, adapter=adapter, optimizer=OptimizerState(step=0), fingerprint="fp")
    return s0.successor(round_=1, adapter=adapter, optimizer=shared_optimizer(), update_sha256="ab" * 32, tokens=10,
                        speeds={}, round_seconds=1.0, momentum=momentum)


def test_momentum_travels_with_the_state_and_is_inside_its_lineage(tmp_path):
    from swarm import checkpoint

    shapes = {"m.lora_A": (2, 3), "m.lora_B": (3, 2)}
    mom = {"m.lora_A": np.full((2, 3), 0.5, np.float32), "m.lora_B": np.full((3, 2), -0.25, np.float32)}
    state, plain = _state(mom), _state()
    assert state.lineage != plain.lineage and state.verified_lineage() and plain.verified_lineage()
    meta, arrays = state.to_wire()
    back = TrainingState.from_wire(meta, arrays, shapes, "fp", "test")
    assert back.lineage == state.lineage and all(np.array_equal(back.momentum[k], mom[k]) for k in mom)
    checkpoint.save(tmp_path / "ck", state)
    assert checkpoint.load(tmp_path / "ck", shapes, "fp").momentum_sha256 == state.momentum_sha256
    # a tampered momentum no longer follows from the lineage the swarm votes on
    bad = [a.copy() for a in arrays]
    bad[-1][0, 0] = 9.0
    with pytest.raises(StateError, match="lineage"):
        TrainingState.from_wire(meta, bad, shapes, "fp", "test")
    with pytest.raises(StateError, match="lineage"):  # nor does a state stripped of it
        TrainingState.from_wire({**meta, "momentum": False}, arrays[:-2], shapes, "fp", "test")
    with pytest.raises(StateError, match="momentum"):
        TrainingState.from_wire({**meta, "momentum": "yes"}, arrays, shapes, "fp", "test")
    # a state without momentum is what it always was on the wire
    assert "momentum" not in plain.to_wire()[0] and len(plain.to_wire()[1]) == 2


def test_ab_mismatch_is_zero_when_one_factor_is_shared():
    rng = np.random.default_rng(1)
    start = {"m.lora_A": rng.standard_normal((2, 5)), "m.lora_B": np.zeros((4, 2))}
    both = [{"m.lora_A": start["m.lora_A"] + 0.1 * rng.standard_normal((2, 5)),
             "m.lora_B": 0.1 * rng.standard_normal((4, 2))} for _ in range(3)]
    only_b = [{"m.lora_A": start["m.lora_A"], "m.lora_B": e["m.lora_B"]} for e in both]
    assert ab_mismatch(start, both) > 0.01
    assert ab_mismatch(start, only_b) < 1e-12


@pytest.mark.slow
def test_testbed_local_steps_identical_every_outer_round_and_loss_falls(tmp_path):
    """Real processes: 2 peers, the tiny model, H = 3 inner steps, 3 outer rounds, factors alternating."""
    from conftest import ROOT

    run = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    run["name"] = "tiny-local"
    run["train"].update(local_steps=3, tokens_per_round=3072, micro_batch=4, lora_factor="alternate")
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(run))
    out = tmp_path / "bed"
    res = run_cli("swarm.testbed", "--peers", "2", "--max-rounds", "3", "--config", str(path), "--output", str(out),
                  timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["all_adapters_identical"]
    rows = [metrics(out / f"peer{k}" / "metrics.jsonl") for k in range(2)]
    assert [m["round"] for m in rows[0]] == [1, 2, 3] == [m["round"] for m in rows[1]]
    for a, b in zip(*rows):  # bit-identical after every outer round, and the group trained the whole budget
        assert a["adapter_sha256"] == b["adapter_sha256"] and a["lineage"] == b["lineage"]
        assert a["group_size"] == 2 and a["group_tokens"] == 3072 and a["accumulation_steps"] >= 3
    assert rows[0][-1]["group_loss"] < rows[0][0]["group_loss"] - 0.05, [m["group_loss"] for m in rows[0]]
    # the checkpoint holds the outer momentum (and no inner AdamW moments: those stay each peer's own)
    meta = json.loads((out / "peer0" / "checkpoint" / "meta.json").read_text())
    assert meta["momentum"] is True and meta["round"] == 3 and meta["optimizer_step"] == 0


class _Quadratic:
    """A stand-in backend: loss 0.5 ||p - target||^2 per token, SGD inner steps, a step counter as 'optimizer'."""

    def __init__(self, start):
        self.p = {k: v.copy() for k, v in start.items()}
        self.steps, self.calls = 0, []

    def train(self, batches):
        from swarm.backends.base import TrainResult

        n = sum(len(b) for b in batches)
        self.calls.append(n)
        return TrainResult(grads={k: (v - 1.0).astype(np.float32) for k, v in self.p.items()}, tokens=n,
                           loss_sum=float(n), seconds=0.0)

    def apply_update(self, g):
        self.steps += 1
        self.p = {k: (v - 0.25 * g[k]).astype(np.float32) for k, v in self.p.items()}

    def get_adapter(self):
        return {k: v.copy() for k, v in self.p.items()}

    def set_adapter(self, t):
        self.p = {k: np.asarray(v, np.float32).copy() for k, v in t.items()}

    def get_optimizer(self):
        return OptimizerState(step=self.steps)

    def set_optimizer(self, s):
        self.steps = s.step


@pytest.mark.parametrize("factor", ["both", "alternate"])
def test_inner_loop_takes_h_steps_returns_the_pseudo_gradient_and_restores(factor):
    from swarm.local_steps import LocalSteps

    t = RunConfig.model_validate({"train": {"local_steps": 3, "lora_factor": factor, "max_grad_norm": 100.0}}).train
    start = {"m.lora_A": np.zeros((1, 2), np.float32), "m.lora_B": np.zeros((2, 1), np.float32)}
    be = _Quadratic(start)
    local = LocalSteps(t, sorted(start), {k: v.shape for k, v in start.items()})
    res = local.train(be, [np.zeros((1, 3))] * 7, 7, 1, start)
    assert be.calls == [3, 2, 2] and be.steps == 3 and res.tokens == 7   # 7 micro-batches in 3 inner steps
    moved = 1 - 0.75 ** 3  # three SGD steps of 0.25 towards 1 from 0
    np.testing.assert_allclose(res.grads["m.lora_B"], -moved, rtol=1e-6)   # start - end
    np.testing.assert_allclose(res.grads["m.lora_A"], 0.0 if factor == "alternate" else -moved, rtol=1e-6)
    local.restore(be, start)  # a rolled-back round: the start adapter and inner state come back
    assert be.steps == 0 and all(np.array_equal(be.p[k], start[k]) for k in start)
    res = local.train(be, [np.zeros((1, 3))] * 2, 2, 2, start)  # fewer micro-batches than H: fewer steps
    assert be.steps == 2 and res.tokens == 2
    m = local.commit(be, start, {k: np.full(v.shape, 0.1, np.float32) for k, v in start.items()}, {})
    np.testing.assert_allclose(be.p["m.lora_A"], -0.7 * 0.1 * 1.9, rtol=1e-6)
    assert np.allclose(m["m.lora_A"], 0.1)
