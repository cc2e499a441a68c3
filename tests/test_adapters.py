"""The canonical adapter layout and its mlx-lm / peft conversions: exact, strict, and written atomically."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from swarm import SwarmError
from swarm.adapters import (
    ADAPTER_CONFIG,
    MLX_ADAPTER_FILE,
    from_mlx,
    from_peft_key,
    load_mlx_adapter,
    mlx_adapter_config,
    save_mlx_adapter,
    to_mlx,
    to_peft_key,
)
from swarm.config import BuiltinModel, LoraConfig, ModelConfig, RunConfig

HAVE_MLX = importlib.util.find_spec("mlx") is not None
needs_mlx = pytest.mark.skipif(not HAVE_MLX, reason='mlx is not installed (pip install -e ".[mlx]")')

TINY = BuiltinModel(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
RUN = RunConfig(model=ModelConfig(builtin=TINY), lora=LoraConfig(r=4, alpha=12.0))


def _awkward(shape, rng) -> np.ndarray:
    """fp32 values a lossy conversion would change: -0.0, subnormals, inf, nan, large and tiny."""
    a = rng.standard_normal(shape).astype(np.float32)
    flat = a.reshape(-1)
    flat[:6] = [-0.0, np.float32(1e-45), np.inf, -np.inf, np.nan, np.float32(3.4e38)]
    return a


def _canonical(rng) -> dict[str, np.ndarray]:
    out = {}
    for layer in range(2):
        for mod, (o, i) in {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32), "mlp.down_proj": (32, 48)}.items():
            p = f"model.layers.{layer}.{mod}"
            out[f"{p}.lora_A"] = _awkward((4, i), rng)
            out[f"{p}.lora_B"] = _awkward((o, 4), rng)
    return out


def _same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a)


def test_mlx_names_and_orientation():
    a = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)       # (r, in)
    b = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)       # (out, r)
    m = to_mlx({"model.layers.0.self_attn.q_proj.lora_A": a, "model.layers.0.self_attn.q_proj.lora_B": b})
    assert set(m) == {"model.layers.0.self_attn.q_proj.lora_a", "model.layers.0.self_attn.q_proj.lora_b"}
    assert m["model.layers.0.self_attn.q_proj.lora_a"].shape == (6, 4)   # mlx-lm: (in, r)
    assert m["model.layers.0.self_attn.q_proj.lora_b"].shape == (4, 5)   # mlx-lm: (r, out)
    # Same function: peft's B @ A equals mlx-lm's (a @ b).T
    np.testing.assert_array_equal(b @ a, (m["model.layers.0.self_attn.q_proj.lora_a"] @ m["model.layers.0.self_attn.q_proj.lora_b"]).T)


@pytest.mark.parametrize("bad", ["model.layers.0.q_proj.weight", "lora_A", "model.layers.0.q_proj.lora_a"])
def test_to_mlx_rejects_non_canonical_names(bad):
    with pytest.raises(SwarmError, match="not a canonical LoRA tensor name"):
        to_mlx({bad: np.zeros((2, 2), np.float32)})


def test_from_mlx_rejects_non_mlx_names_and_shapes():
    with pytest.raises(SwarmError, match="not a mlx LoRA tensor name"):
        from_mlx({"model.layers.0.q_proj.lora_A": np.zeros((2, 2), np.float32)})
    with pytest.raises(SwarmError, match="expected 2 dimensions"):
        from_mlx({"model.layers.0.q_proj.lora_a": np.zeros((2,), np.float32)})


def test_numpy_round_trip_is_bitwise():
    canon = _canonical(np.random.default_rng(0))
    assert _same_bits(from_mlx(to_mlx(canon)), canon)
    assert _same_bits({from_peft_key(to_peft_key(k)): v for k, v in canon.items()}, canon)


@needs_mlx
@pytest.mark.mlx
def test_torch_canonical_mlx_canonical_torch_is_bitwise(tmp_path, monkeypatch):
    """Live peft parameters -> canonical -> mlx arrays -> canonical -> torch parameters, bit for bit."""
    import mlx.core as mx
    import torch

    from swarm.backends.torch_lora import load_peft_model
    from swarm.model import resolve_model_dir

    monkeypatch.setenv("SWARM_CACHE", str(tmp_path))
    model = load_peft_model(RUN, resolve_model_dir(RUN.model))
    g = torch.Generator().manual_seed(0)
    live = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in live.values():
            p.copy_(torch.randn(p.shape, generator=g))
        next(iter(live.values())).view(-1)[:3] = torch.tensor([-0.0, 1e-45, float("nan")])
    canon = {from_peft_key(n): p.detach().numpy().copy() for n, p in live.items()}
    assert len(canon) == 2 * 7 * TINY.num_hidden_layers
    on_mlx = {k: mx.array(v) for k, v in to_mlx(canon).items()}                 # what the MLX backend holds
    back = from_mlx({k: np.array(v) for k, v in on_mlx.items()})
    assert _same_bits(back, canon)
    state = {to_peft_key(k): torch.from_numpy(v) for k, v in back.items()}      # what save_peft_adapter writes
    for n, p in live.items():
        q = state[to_peft_key(from_peft_key(n))]
        assert p.dtype == q.dtype and p.shape == q.shape
        assert p.detach().numpy().tobytes() == q.numpy().tobytes()


def test_mlx_adapter_config_matches_mlx_lm_schema():
    canon = _canonical(np.random.default_rng(1))
    cfg = mlx_adapter_config(canon, RUN)
    assert cfg == {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 3.0, "dropout": 0.0,
                            "keys": ["mlp.down_proj", "self_attn.k_proj", "self_attn.q_proj"]},
    }
    # A module outside the transformer blocks keeps its full path (mlx-lm matches it at the top level).
    cfg = mlx_adapter_config({"lm_head.lora_A": np.zeros((4, 32)), **canon}, RUN)
    assert "lm_head" in cfg["lora_parameters"]["keys"]


def test_save_mlx_adapter_writes_mlx_lm_files_atomically(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(2)
    target = tmp_path / "adapter"
    first, second = _canonical(rng), _canonical(rng)
    save_mlx_adapter(target, first, RUN)
    save_mlx_adapter(target, second, RUN)                       # overwrite: the new one, whole
    assert sorted(p.name for p in target.iterdir()) == sorted([MLX_ADAPTER_FILE, ADAPTER_CONFIG])
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary or old directory left behind
    raw = load_file(str(target / MLX_ADAPTER_FILE))
    assert raw["model.layers.1.mlp.down_proj.lora_a"].shape == (48, 4)
    assert json.loads((target / ADAPTER_CONFIG).read_text())["lora_parameters"]["rank"] == 4
    assert _same_bits(load_mlx_adapter(target), second)
    with pytest.raises(SwarmError, match="no mlx adapter"):
        load_mlx_adapter(tmp_path / "missing")
