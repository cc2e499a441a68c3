"""A torch peer and an MLX peer train one adapter together over 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ROOT, metrics

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install -e '.[mlx]')")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install -e '.[mlx]')")
pytestmark = [pytest.mark.slow, pytest.mark.mlx]

TOL = 1e-5  # fp32: torch and MLX kernels differ in summation order; AdamW amplifies nothing at this scale


def test_torch_and_mlx_peers_hold_the_same_adapter_every_round(peers):
    cfg = str(ROOT / "configs" / "tiny.yaml")
    common = ["--config", cfg, "--max-rounds", "4", "--min-peers", "2"]
    peers.start("torch", *common, "--backend", "torch")
    peers.start("mlx", *common, "--backend", "mlx", initial_peers=peers.addrs("torch"))
    assert peers.wait("torch", 400) == 0, peers.log("torch")[-3000:]
    assert peers.wait("mlx", 400) == 0, peers.log("mlx")[-3000:]
    mt, mm = metrics(peers.base / "torch" / "metrics.jsonl"), metrics(peers.base / "mlx" / "metrics.jsonl")
    assert [m["round"] for m in mt] == [m["round"] for m in mm] == [1, 2, 3, 4]
    assert {m["backend"] for m in mt} == {"torch"} and {m["backend"] for m in mm} == {"mlx"}
    for a, b in zip(mt, mm):                       # after every round
        assert a["group_size"] == b["group_size"] == 2
        assert abs(a["adapter_norm"] - b["adapter_norm"]) <= TOL * max(1.0, a["adapter_norm"])
    assert mt[-1]["group_loss"] < mt[0]["group_loss"]

    from swarm.adapters import load_mlx_adapter, load_peft_adapter

    ta, ma = load_peft_adapter(peers.base / "torch" / "adapter"), load_peft_adapter(peers.base / "mlx" / "adapter")
    worst = max(float(np.max(np.abs(ta[k] - ma[k]))) for k in ta)
    print(f"max |torch - mlx| adapter difference after 4 rounds: {worst:.3g}")
    assert worst < TOL
    assert set(load_mlx_adapter(peers.base / "torch" / "mlx_adapter")) == set(load_mlx_adapter(peers.base / "mlx" / "mlx_adapter"))

    # what each backend wrote loads in the other world: peft for the MLX peer's, mlx-lm for the torch peer's
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg_json = json.loads((peers.base / "mlx" / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg_json["base_model_name_or_path"])
    PeftModel.from_pretrained(base, str(peers.base / "mlx" / "adapter"))
    import mlx_lm

    mlx_lm.load(cfg_json["base_model_name_or_path"], adapter_path=str(peers.base / "torch" / "mlx_adapter"))
