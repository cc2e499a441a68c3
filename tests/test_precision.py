"""Base precision per peer: the base in fp32/bf16/nf4, the adapter fp32 everywhere, one adapter in a mixed swarm."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import ROOT, metrics, run_cli
from swarm import SwarmError
from swarm.precision import PrecisionSettings, settings, support, supported

TINY = str(ROOT / "configs" / "tiny.yaml")
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
needs_mlx = pytest.mark.skipif(not HAS_MLX, reason='mlx and mlx-lm are not installed (pip install -e ".[mlx]")')
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="nf4 needs bitsandbytes (pip install -e '.[qlora]')")


def test_support_table_carries_reasons():
    assert support("fp32", "cpu").ok and support("bf16", "cpu").ok
    fp16 = support("fp16", "cpu")
    assert not fp16.ok and "GPU" in fp16.reason
    assert support("fp16", "cuda").ok
    if HAS_MLX:  # mlx: fp32, bf16 and mlx-lm's 4-bit under the name nf4; fp16 is torch-on-GPU only
        assert [s.ok for s in supported("cpu", "mlx")] == [True, True, False, True]
        assert "4-bit" in support("nf4", "mlx", "mlx").reason and "--backend torch" in support("fp16", "mlx", "mlx").reason
    else:
        assert "pip install" in support("bf16", "cpu", "mlx").reason
    assert support("nf4", "cpu").ok == HAS_BNB


def test_settings_auto_and_forced():
    assert settings("auto", "cpu").precision == "fp32"
    assert settings("auto", "cpu", allowed=("bf16", "nf4")).precision == "bf16"
    assert settings("bf16", "cpu").precision == "bf16"
    with pytest.raises(SwarmError, match="fp16 needs a GPU"):
        settings("fp16", "cpu")
    with pytest.raises(SwarmError, match="allows only"):
        settings("bf16", "cpu", allowed=("fp32",))
    with pytest.raises(SwarmError):
        PrecisionSettings("int3")


@pytest.mark.parametrize("precision", ["fp32", "bf16", pytest.param("nf4", marks=needs_bnb)])
def test_torch_base_in_precision_keeps_the_adapter_fp32(precision, tmp_path):
    import torch

    from swarm.backends import load_backend
    from swarm.config import load_config
    from swarm.model import resolve_model_dir

    run = load_config(TINY)
    b = load_backend("torch", run=run, model_dir=resolve_model_dir(run.model), threads=1,
                     precision=PrecisionSettings(precision, "test", gradient_checkpointing=precision == "bf16"))
    frozen = {p.dtype for p in b.model.parameters() if not p.requires_grad}
    want = {"fp32": {torch.float32}, "bf16": {torch.bfloat16}, "nf4": {torch.bfloat16, torch.uint8}}[precision]
    assert frozen == want
    assert {p.dtype for p in b.params.values()} == {torch.float32}
    batch = np.random.default_rng(0).integers(0, 256, size=(2, 33))
    r = b.train([batch])
    assert r.tokens == 64 and np.isfinite(r.loss_sum)
    assert all(g.dtype == np.float32 for g in r.grads.values())
    assert sum(float(np.abs(g).sum()) for g in r.grads.values()) > 0
    before = b.get_adapter()
    b.apply_update(r.grads)
    after = b.get_adapter()
    assert all(a.dtype == np.float32 for a in after.values()) and any((after[k] != before[k]).any() for k in after)
    _loads_everywhere(after, run, resolve_model_dir(run.model), tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sharded", [False, True])
def test_torch_loader_reads_the_tensors_transformers_reads(dtype, sharded, tmp_path):
    """The torch backend reads checkpoints with pread (not mmap, so a converting load does not hold the whole file
    resident): the same values as transformers' own loader, in a single file and in shards."""
    import torch
    from transformers import AutoModelForCausalLM

    from swarm.backends.torch_lora import _from_pretrained
    from swarm.config import load_config
    from swarm.model import resolve_model_dir

    src = resolve_model_dir(load_config(TINY).model)
    model_dir = src
    if sharded:
        model_dir = tmp_path / "sharded"
        AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(str(model_dir), max_shard_size="100KB")
        assert (model_dir / "model.safetensors.index.json").is_file()
    ours = _from_pretrained(model_dir, {"dtype": getattr(torch, dtype)}).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == getattr(torch, dtype) and torch.equal(ours[k], theirs[k]) for k in ours)


def _loads_everywhere(adapter, run, model_dir, tmp_path):
    """An adapter trained in any precision loads, bit for bit, with peft on the fp32 and on the bf16 base, and
    (when mlx-lm is installed) in mlx-lm on the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from swarm.adapters import from_mlx, save_mlx_adapter, save_peft_adapter

    save_peft_adapter(tmp_path / "peft", adapter, run, model_dir)
    for dtype in (torch.float32, torch.bfloat16):
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype), str(tmp_path / "peft"))
        live = {n.replace("base_model.model.", "").replace(".default", "").removesuffix(".weight"): p
                for n, p in m.named_parameters() if "lora_" in n}
        assert live.keys() == adapter.keys()
        assert all(torch.equal(live[k].detach().float(), torch.from_numpy(adapter[k])) for k in adapter), dtype
    if HAS_MLX:
        import mlx_lm
        from mlx.utils import tree_flatten

        save_mlx_adapter(tmp_path / "mlx", adapter, run)
        model, _ = mlx_lm.load(str(model_dir), adapter_path=str(tmp_path / "mlx"))
        lora = from_mlx({k: np.array(v) for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")})
        assert lora.keys() == adapter.keys() and all(np.array_equal(lora[k], adapter[k]) for k in adapter)


@needs_mlx
@pytest.mark.mlx
@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_mlx_base_in_precision_keeps_the_adapter_fp32_and_torchs_update(precision, tmp_path):
    """MLX bf16 / mlx-lm 4-bit base: the adapter and its update stay fp32, so the same averaged gradient moves
    it exactly as it moves a torch fp32 peer's (up to fp32 op order: test_mlx_backend's tolerance)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from swarm.backends import load_backend
    from swarm.config import load_config
    from swarm.model import resolve_model_dir

    run = load_config(TINY)
    d = resolve_model_dir(run.model)
    t = load_backend("torch", run=run, model_dir=d, threads=1, seed=5)
    m = load_backend("mlx", run=run, model_dir=d, seed=5, precision=PrecisionSettings(precision, "test", framework="mlx"))
    lora = {k for k, _ in tree_flatten(m.model.trainable_parameters())}
    frozen = {str(a.dtype) for k, a in tree_flatten(m.model.parameters()) if k not in lora}
    assert frozen == ({"mlx.core.bfloat16"} if precision == "bf16" else {"mlx.core.bfloat16", "mlx.core.uint32"})
    quantized = [p for p, mod in m.model.named_modules() if isinstance(mod, nn.QuantizedLinear)]
    # every block linear of the 2 layers but down_proj, whose input width 172 no group size (64, 32) divides
    assert len(quantized) == (12 if precision == "nf4" else 0) and not any("down_proj" in p for p in quantized)
    assert {a.dtype for _, a in tree_flatten(m.model.trainable_parameters())} == {mx.float32}
    batch = np.random.default_rng(0).integers(0, 256, size=(2, 33))
    rt, rm = t.train([batch]), m.train([batch])
    assert rm.tokens == 64 and abs(rm.loss_sum / rm.tokens - rt.loss_sum / rt.tokens) < 0.02
    assert all(g.dtype == np.float32 for g in rm.grads.values()) and sum(float(np.abs(g).sum()) for g in rm.grads.values()) > 0
    assert t.get_adapter().keys() == m.get_adapter().keys()
    for _ in range(2):  # the same averaged gradient on both
        t.apply_update(rt.grads)
        m.apply_update(rt.grads)
    ta, ma = t.get_adapter(), m.get_adapter()
    assert all(a.dtype == np.float32 for a in ma.values())
    assert max(float(np.abs(ta[k] - ma[k]).max()) for k in ta) < 1e-6
    _loads_everywhere(ma, run, d, tmp_path)


@needs_mlx
def test_mlx_peer_that_cannot_run_a_precision_is_one_line_exit_2(tmp_path):
    res = run_cli("swarm.join", "--config", TINY, "--backend", "mlx", "--precision", "fp16", "--output", str(tmp_path / "p"),
                  "--host", "127.0.0.1", "--max-rounds", "1", timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--precision fp16: the mlx backend trains fp32, bf16 and nf4" in lines[0], res.stderr


@needs_mlx
def test_mlx_names_the_families_it_covers(tmp_path):
    import json

    from swarm.backends.mlx_lora import covers, load_lora_model
    from swarm.config import load_config

    assert all(covers(t) for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_family", "vocab_size": 8}))
    with pytest.raises(SwarmError, match="no model class for model_type 'not_a_family'.*--backend torch") as e:
        load_lora_model(load_config(TINY), tmp_path)
    assert "\n" not in str(e.value)


def test_forced_precision_the_peer_cannot_run_is_one_line_exit_2(tmp_path):
    res = run_cli("swarm.join", "--config", TINY, "--precision", "fp16", "--output", str(tmp_path / "p"),
                  "--host", "127.0.0.1", "--max-rounds", "1", timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "fp16 needs a GPU" in lines[0], res.stderr


@pytest.mark.slow
@needs_bnb
def test_mixed_precision_swarm_ends_every_round_with_one_adapter(tmp_path):
    out = tmp_path / "bed"
    res = run_cli("swarm.testbed", "--peers", "3", "--max-rounds", "3", "--config", TINY,
                  "--precision", "fp32,bf16,nf4", "--output", str(out), timeout=420)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    rows = [metrics(out / f"peer{k}" / "metrics.jsonl") for k in range(3)]
    assert [r[-1]["precision"] for r in rows] == ["fp32", "bf16", "nf4"]
    assert all(r[-1]["checkpointing"] is False for r in rows)
    for rnd in (1, 2, 3):
        hashes = {m["adapter_sha256"] for r in rows for m in r if m["round"] == rnd}
        assert len(hashes) == 1, (rnd, hashes)


def test_run_config_lists_allowed_precisions_outside_the_fingerprint(tmp_path):
    from swarm.config import RunConfig, TrainConfig, load_config

    assert TrainConfig().precisions == ("fp32", "bf16", "fp16", "nf4")
    narrow = RunConfig(train=TrainConfig(precisions=("nf4",)))
    assert narrow.fingerprint() == RunConfig().fingerprint()  # peers differ in precision, not in the adapter
    assert narrow.fingerprint() != RunConfig(train=TrainConfig(lr=1e-4)).fingerprint()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  precisions: [fp8]\n")
    with pytest.raises(SwarmError, match="train.precisions"):
        load_config(bad)
    req = settings("auto", "cpu")
    assert req.for_run(("bf16", "nf4")).precision == "bf16"
    with pytest.raises(SwarmError, match="allows only"):
        settings("bf16", "cpu").for_run(("fp32",))


def test_auto_picks_the_most_precise_option_that_fits_then_checkpointing():
    from swarm.precision import choose

    req = settings("auto", "cpu")
    fits_bf16 = lambda p, ckpt: p != "fp32"  # noqa: E731
    assert choose(req, ("fp32", "bf16", "nf4"), fits_bf16).precision == "bf16"
    only_ckpt_nf4 = lambda p, ckpt: ckpt and p == "nf4"  # noqa: E731
    c = choose(req, ("fp32", "bf16", "nf4"), only_ckpt_nf4)
    assert HAS_BNB <= (c.precision == "nf4" and c.gradient_checkpointing)
    forced = settings("fp32", "cpu")
    assert choose(forced, ("fp32", "bf16"), fits_bf16).precision == "fp32"  # forced is kept
    none = choose(req, ("fp32", "bf16"), lambda p, ckpt: False)  # nothing fits: the least it needs, to advertise
    assert (none.precision, none.gradient_checkpointing) == ("bf16", True)


def _fit_table():
    """(case, platform, framework, allowed, usable bytes, precision, checkpointing, fits) against the memory model."""
    from swarm.memory import NAMED_SHAPES, estimate

    shape = NAMED_SHAPES["1B"]
    kw = dict(lora_r=8, lora_targets=None, micro_batch=1, seq_len=512)

    def need(p, ckpt=False, backend="cuda"):
        return estimate(shape, "qlora" if p == "nf4" else "lora", grad_checkpointing=ckpt, backend=backend,
                        dtype={"fp32": "float32", "nf4": "bfloat16"}.get(p, "bfloat16"), **kw).total

    rows = [
        ("roomy: fp32", "cuda", "torch", ALL, need("fp32"), "fp32", False, True),
        ("a byte short of fp32: bf16", "cuda", "torch", ALL, need("fp32") - 1, "bf16", False, True),
        ("16-bit too big: 4-bit", "cuda", "torch", ALL, need("nf4"), "nf4", False, True),
        ("4-bit too big: 4-bit with checkpointing", "cuda", "torch", ALL, need("nf4") - 1, "nf4", True, True),
        ("the run allows only fp32: fp32 with checkpointing", "cuda", "torch", ("fp32",), need("fp32") - 1, "fp32", True, True),
        ("nothing fits: the least it needs, advertised", "cuda", "torch", ALL, need("nf4", True) - 1, "nf4", True, False),
        ("mlx: its own 4-bit format and runtime", "mlx", "mlx", ("fp32", "nf4"), need("nf4", backend="mlx"), "nf4", False, True),
    ]
    if not HAS_BNB:
        rows = [r for r in rows if r[5] != "nf4" or r[2] == "mlx"]
    if not HAS_MLX:
        rows = [r for r in rows if r[2] != "mlx"]
    return rows


ALL = ("fp32", "bf16", "fp16", "nf4")


@pytest.mark.parametrize("case,platform,framework,allowed,usable,precision,ckpt,fits", _fit_table(), ids=lambda v: v if isinstance(v, str) and " " in v else "")
def test_fit_picks_the_most_precise_option_that_fits(case, platform, framework, allowed, usable, precision, ckpt, fits):
    from swarm.config import LoraConfig, RunConfig, TrainConfig
    from swarm.memory import NAMED_SHAPES
    from swarm.precision import fit

    run = RunConfig(lora=LoraConfig(r=8, target_modules=None), train=TrainConfig(seq_len=512, micro_batch=4, precisions=allowed))
    f = fit(settings("auto", platform, framework), run, NAMED_SHAPES["1B"], usable)
    assert (f.settings.precision, f.settings.gradient_checkpointing, f.max_micro_batch >= 1) == (precision, ckpt, fits)
    assert (f.needed_bytes <= usable) == fits


def test_advert_carries_precision_and_tolerates_new_names():
    from swarm.records import RecordError, parse_advert

    base = dict(version=1, peer_id="p", run="r", backend="cpu", device="d", tier="t", memory_total_bytes=10,
                memory_usable_bytes=5, throughput_tokens_per_s=1.0, max_micro_batch=1, timestamp=1.0)
    assert parse_advert(base).precision == "fp32"
    a = parse_advert({**base, "precision": "nf4", "precisions": ["fp32", "nf4", "fp8"], "checkpointing": True})
    assert a.precision == "nf4" and a.precisions == ["fp32", "nf4", "fp8"] and a.checkpointing
    with pytest.raises(RecordError):
        parse_advert({**base, "precisions": ["x" * 50]})
    with pytest.raises(RecordError):
        parse_advert({**base, "checkpointing": "yes"})


@pytest.mark.slow
def test_a_peer_that_fits_no_allowed_option_is_excluded_and_status_says_why(peers):
    """Real processes: a peer whose --memory-limit fits no option says why in one line (exit 2); its last advert
    keeps it in swarm.status as excluded, with the planner's reason, while the swarm trains on."""
    import json

    peers.start("a", "--config", TINY, "--max-rounds", "1000")
    addrs = peers.addrs("a")
    peers.start("small", "--config", TINY, "--memory-limit", "0.2", initial_peers=addrs)
    assert peers.wait("small", 120) == 2
    last = peers.log("small").strip().splitlines()[-1]
    assert last.startswith("error: this machine cannot train run 'tiny'") and "fits no allowed option: micro-batch 1 needs" in last
    least = "nf4 with gradient checkpointing" if HAS_BNB else "bf16 with gradient checkpointing"
    assert least in last and "0.21 GB usable" in last, last
    snap = json.loads(run_cli("swarm.status", "--initial-peers", *addrs, "--json", timeout=60).stdout)
    (run,) = snap["runs"]
    by_state = {p["state"]: p for p in run["peers"]}
    small = by_state["excluded"]
    assert small["excluded"] == "does_not_fit" and small["why"] in last and small["precision"] == least.split()[0]
    assert small["peer_id"] in {e["peer_id"] for e in run["plan"]["excluded"]}
    assert {p["state"] for p in run["peers"]} == {"excluded", "training"} and len(run["peers"]) == 2
