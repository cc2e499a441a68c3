"""The memory model: the 16-bytes rule, the reference table, tensor-by-tensor activations, monotonicity."""

from __future__ import annotations

import dataclasses
import json

import pytest

from swarm import SwarmError
from swarm.memory import (
    ALL_TARGETS, NAMED_SHAPES, QUANT_BYTES_PER_PARAM, TABLE_SIZES, ModelShape, _layer_activation_bytes, estimate,
    lora_params, max_micro_batch, normalize_targets, parse_params, shape_for_params,
)

GB = 1e9


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE", str(tmp_path / "cache"))


TINY = ModelShape(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)


# ------------------------------------------------------------------------------------ 16 bytes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("size", ["0.5B", "7B", "30B"])
def test_full_fine_tune_costs_16_bytes_per_parameter_before_activations(size, dtype):
    """fp16 weights 2 + fp32 master 4 + Adam 8 + fp16 grads 2 (fp32: weights 4 + grads 4 + Adam 8)."""
    shape = NAMED_SHAPES[size]
    e = estimate(shape, "full", dtype=dtype)
    assert e.weights + e.trainable == 16 * shape.param_count()
    assert e.trainable_params == shape.param_count()


def test_lora_trains_16_bytes_per_adapter_parameter_and_keeps_the_base_in_its_dtype():
    shape = NAMED_SHAPES["7B"]
    e = estimate(shape, "lora", lora_r=16, dtype="bfloat16")
    assert e.weights == 2 * shape.param_count()
    assert e.trainable == 16 * e.trainable_params == 16 * lora_params(shape, 16, ALL_TARGETS)


def test_qlora_is_4_bit_blocks_plus_constants_with_16_bit_embeddings():
    shape = NAMED_SHAPES["7B"]
    e = estimate(shape, "qlora")
    per_param = QUANT_BYTES_PER_PARAM["bnb-nf4-dq"]
    assert 0.5 < per_param < 0.52  # 4 bits + ~0.127 bits of double-quantized constants (QLoRA paper)
    assert e.weights == pytest.approx(shape.block_linear_params() * per_param + 2 * (shape.embedding_params() + shape.norm_params()), abs=1)
    mlx = estimate(shape, "qlora", backend="mlx")
    assert mlx.weights > e.weights  # fp16 scale + bias per group of 64


def test_parts_add_up():
    for method in ("qlora", "lora", "full"):
        e = estimate(NAMED_SHAPES["1B"], method, micro_batch=3, seq_len=300)
        assert e.total == e.weights + e.trainable + e.activations + e.overhead
        assert e.parts()["total_bytes"] == e.total


# ------------------------------------------------------------------------------ the reference


#: shared/reference/consumer-hardware-for-ai-training.txt §4, GB: (QLoRA, LoRA, full fine-tune)
REFERENCE = {"0.5B": (2, 4, 8), "1B": (3, 6, 16), "3B": (5, 10, 40), "7B": (8, 18, 56), "13B": (14, 32, 104), "30B": (30, 70, 240)}
#: The setting we compare at: "minimum memory" = micro-batch 1; a modest 512-token context; 16-bit
#: compute on a GPU; the run's default adapter (r=8 on all seven linears); no checkpointing.
REF_SETTING = dict(micro_batch=1, seq_len=512, dtype="bfloat16", backend="cuda", lora_r=8, lora_targets=ALL_TARGETS)


def fp32_adapter_cost(shape: ModelShape) -> int:
    """What swarm's trainer saves beyond a 16-bit-adapter trainer under a 16-bit base, at REF_SETTING:
    its adapters stay fp32 (exact averaging), so each LoRA target saves an fp32 copy of its input where
    the usual recipe saves the 16-bit normed outputs and MLP product once."""
    tokens = REF_SETTING["micro_batch"] * REF_SETTING["seq_len"]
    h, i = shape.hidden_size, shape.intermediate_size
    copies = 4 * sum(shape.linear_shapes()[t][0] for t in ALL_TARGETS)
    return shape.num_layers * tokens * (copies - 2 * (2 * h + i))


def reference_ratio(size: str, method: str, shape: ModelShape | None = None) -> float:
    """Our estimate ÷ the reference, both for the usual 16-bit-adapter recipe the reference assumes."""
    col = {"qlora": 0, "lora": 1, "full": 2}[method]
    shape = shape or NAMED_SHAPES[size]
    ours = estimate(shape, method, **REF_SETTING).total - (fp32_adapter_cost(shape) if method != "full" else 0)
    return ours / GB / REFERENCE[size][col]


@pytest.mark.parametrize("size", TABLE_SIZES)
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_model_agrees_with_the_reference_table_within_a_third(size, method):
    ratio = reference_ratio(size, method)
    if (size, method) == ("0.5B", "qlora"):
        # Our 0.5B is Qwen2.5-0.5B: its 152k-token vocabulary makes the unquantized embeddings
        # (136M params, 0.27 GB) and the fp32 loss head (512 x 152k logits, ~0.8 GB) half of the
        # total. The reference's ~2 GB matches a 32k-vocabulary 0.5B model: checked below.
        assert ratio < 1.45
        small_vocab = dataclasses.replace(NAMED_SHAPES["0.5B"], vocab_size=32000, tie_embeddings=False)
        assert 2 / 3 <= reference_ratio(size, method, small_vocab) <= 4 / 3
        return
    assert 2 / 3 <= ratio <= 4 / 3, f"{size} {method}: {ratio:.2f} x the reference"


@pytest.mark.parametrize("size", TABLE_SIZES)
def test_full_fine_tune_follows_the_16_byte_rule_not_the_reference_column(size):
    """The reference's full column is 16 B/param for 0.5B and 1B but 8 B/param for 7B-30B (and
    13 for 3B): not one rule. We follow 16 B/param (what AdamW in mixed precision allocates), so
    we are at or above the reference everywhere and about 2x above it for 7B and up."""
    shape = NAMED_SHAPES[size]
    ours = estimate(shape, "full", **REF_SETTING).total
    ref_bytes_per_param = REFERENCE[size][2] * GB / shape.param_count()
    assert 7 <= ref_bytes_per_param <= 17
    assert ours >= 16 * shape.param_count() >= 0.9 * REFERENCE[size][2] * GB


# ------------------------------------------------------------------------- activations, tensor by tensor


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_accounting_matches_the_tensors_autograd_saves(dtype):
    """Count the bytes autograd really saves in a peft LoRA Llama (CPU) and compare per block. Under a
    bf16 base the adapter stays fp32, as swarm's trainer keeps it, so each target saves an fp32 copy
    of its input."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = TINY
    cfg = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                      num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                      num_key_value_heads=shape.num_kv_heads, max_position_embeddings=256, use_cache=False,
                      attn_implementation="sdpa")
    model = get_peft_model(LlamaForCausalLM(cfg).to(getattr(torch, dtype)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_TARGETS)))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    assert shape.param_count() == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert lora_params(shape, 4, ALL_TARGETS) == sum(p.numel() for p in model.parameters() if p.requires_grad)

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            saved[st.data_ptr()] = st.nbytes()
        return t

    mb, seq = 3, 40
    ids = torch.randint(0, shape.vocab_size, (mb, seq + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, shape.vocab_size).float(), ids[:, 1:].reshape(-1), reduction="sum")
    head = mb * seq * shape.vocab_size * 4  # fp32 log-probabilities saved by the loss
    per_layer = (sum(saved.values()) - head) / shape.num_layers
    predicted = _layer_activation_bytes(shape, "lora", mb * seq, mb, 4 if dtype == "float32" else 2, 4, ALL_TARGETS)
    assert per_layer == pytest.approx(predicted, rel=0.05)


def test_gradient_checkpointing_saves_activations():
    shape = NAMED_SHAPES["7B"]
    off = estimate(shape, "lora", micro_batch=4, seq_len=1024)
    on = estimate(shape, "lora", micro_batch=4, seq_len=1024, grad_checkpointing=True)
    assert on.activations < off.activations / 4
    assert on.weights == off.weights


# ------------------------------------------------------------------------------ monotonicity


BASE_ARGS = dict(lora_r=8, lora_targets=("q_proj", "v_proj"), micro_batch=2, seq_len=64, grad_checkpointing=False, dtype="bfloat16")
SHAPE_FIELDS = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "num_layers": 1}


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_estimate_is_monotonic_in_every_size(method, ckpt):
    base = dict(BASE_ARGS, grad_checkpointing=ckpt)

    def total(shape=TINY, **kw):
        return estimate(shape, method, **{**base, **kw}).total

    ref = total()
    for name, step in (("micro_batch", 1), ("seq_len", 16), ("lora_r", 4)):
        values = [base[name] + k * step for k in range(6)]
        totals = [total(**{name: v}) for v in values]
        assert totals == sorted(totals), name
        if name != "lora_r" or method != "full":
            assert totals[-1] > totals[0], name
    assert total(lora_targets=ALL_TARGETS) >= ref
    assert total(dtype="float32") >= ref
    for field, step in SHAPE_FIELDS.items():
        totals = [total(dataclasses.replace(TINY, **{field: getattr(TINY, field) + k * step})) for k in range(5)]
        assert totals == sorted(totals) and totals[-1] > totals[0], field
    heads = [total(dataclasses.replace(TINY, num_heads=4, num_kv_heads=kv)) for kv in (1, 2, 4)]  # GQA -> MHA
    assert heads == sorted(heads)
    dims = [total(dataclasses.replace(TINY, head_dim=d)) for d in (8, 16, 32)]
    assert dims == sorted(dims)
    assert total(dataclasses.replace(TINY, tie_embeddings=True)) <= ref


def test_named_sizes_grow_with_size_for_every_method():
    for method in ("qlora", "lora", "full"):
        totals = [estimate(NAMED_SHAPES[s], method).total for s in TABLE_SIZES]
        assert totals == sorted(totals), method


def test_synthetic_shapes_never_shrink_as_the_size_grows():
    sizes = [f"{n}M" for n in (1, 3, 10, 30, 100, 200, 400)] + [f"{n}B" for n in (2, 5, 9, 20, 40, 100)]
    counts = [shape_for_params(s).param_count() for s in sizes]
    totals = [estimate(shape_for_params(s), "lora").total for s in sizes]
    assert counts == sorted(counts) and totals == sorted(totals)
    for s in ("10M", "100M", "2B", "20B"):
        assert 0.75 < shape_for_params(s).param_count() / parse_params(s) < 1.33, s


# ------------------------------------------------------------------------------ max micro-batch


def test_max_micro_batch_is_the_largest_that_fits():
    shape, kw = NAMED_SHAPES["1B"], dict(method="lora", seq_len=256)
    for k in (1, 2, 7, 33):
        budget = estimate(shape, micro_batch=k, **kw).total
        assert max_micro_batch(budget, shape, **kw) == k
        assert max_micro_batch(budget - 1, shape, **kw) == k - 1
    assert max_micro_batch(10, shape, **kw) == 0
    assert max_micro_batch(1 << 50, shape, limit=16, **kw) == 16
    assert max_micro_batch(estimate(shape, micro_batch=40, **kw).total, shape, limit=16, **kw) == 16


# ------------------------------------------------------------------------------------ shapes


def test_named_shapes_have_their_published_parameter_counts():
    expected = {"0.5B": 0.494e9, "1B": 1.236e9, "3B": 3.213e9, "7B": 6.738e9, "13B": 13.016e9, "30B": 32.529e9}
    for size, n in expected.items():
        assert NAMED_SHAPES[size].param_count() == pytest.approx(n, rel=1e-3), size


def test_shape_from_qwen2_config_dir(tmp_path):
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
           "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
           "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = ModelShape.from_dir(tmp_path)
    assert dataclasses.replace(shape, name="0.5B") == NAMED_SHAPES["0.5B"]
    assert shape.name == tmp_path.name


@pytest.mark.parametrize("cfg, match", [
    ({"hidden_size": 64}, "lacks"),
    ({"vocab_size": 10, "hidden_size": 64, "intermediate_size": 0, "num_hidden_layers": 2, "num_attention_heads": 4}, "intermediate_size"),
    ({"vocab_size": 10, "hidden_size": "64", "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 4}, "hidden_size|head_dim"),
    ({"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3}, "multiple"),
    ([1, 2], "JSON object"),
])
def test_bad_configs_are_one_line_errors(cfg, match):
    with pytest.raises(SwarmError, match=match):
        ModelShape.from_config(cfg)


def test_from_dir_errors(tmp_path):
    with pytest.raises(SwarmError, match="no config.json"):
        ModelShape.from_dir(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SwarmError, match="not readable JSON"):
        ModelShape.from_dir(tmp_path)


@pytest.mark.parametrize("text, n", [("7B", 7e9), ("0.5b", 5e8), ("350M", 3.5e8), ("1.5B", 1.5e9), ("7e9", 7e9), ("120000000", 1.2e8)])
def test_parse_params(text, n):
    assert parse_params(text) == pytest.approx(n)


@pytest.mark.parametrize("text", ["7X", "", "B", "-7B", "7 B B", "1e30", "10", "nan"])
def test_parse_params_rejects(text):
    with pytest.raises(SwarmError):
        parse_params(text)


def test_targets_and_arguments_are_validated():
    assert normalize_targets(["all-linear"]) == ALL_TARGETS
    assert normalize_targets(["model.layers.0.self_attn.v_proj", "q_proj"]) == ("q_proj", "v_proj")
    assert normalize_targets(None) == ALL_TARGETS  # lora.target_modules unset: peft's all-linear
    assert normalize_targets(["c_attn", "c_fc"]) == ("q_proj", "k_proj", "v_proj", "up_proj")  # GPT-2's linears
    with pytest.raises(SwarmError, match="unknown LoRA target"):
        normalize_targets(["w_pack"])
    for bad in (dict(method="dora"), dict(dtype="int8"), dict(backend="tpu"), dict(micro_batch=0), dict(seq_len=-1), dict(lora_r=1.5)):
        with pytest.raises(SwarmError):
            estimate(TINY, **{"method": "lora", **bad})
