"""Common Hugging Face families train with the torch backend: tiny random GPT-2 (Conv1D), Gemma and Phi-3
directories written here (transformers config classes + the byte-level tokenizer, no download), one train
step + apply_update, the canonical adapter round-trips and the saved adapter loads in peft on the base."""

from __future__ import annotations

import json

import numpy as np
import pytest

from swarm import SwarmError
from swarm.config import LoraConfig, RunConfig, TrainConfig
from swarm.memory import ModelShape, estimate

V = 260  # the byte-level tokenizer: 256 bytes + 4 specials
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(family: str):
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, **IDS)
    if family == "gemma":
        return tf.GemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64, **IDS)
    return tf.Phi3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **IDS)


def _model_dir(tmp_path, family: str):
    import torch
    from transformers import AutoModelForCausalLM

    from swarm.model import _write_tokenizer

    torch.manual_seed(0)
    d = tmp_path / family
    AutoModelForCausalLM.from_config(_config(family)).save_pretrained(str(d))
    _write_tokenizer(d)
    return d


def _run(targets=None) -> RunConfig:
    return RunConfig(lora=LoraConfig(r=4, alpha=8.0, target_modules=targets), train=TrainConfig(seq_len=16, micro_batch=2))


EXPECTED = {"gpt2": {"c_attn", "c_proj", "c_fc"}, "gemma": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
            "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}


@pytest.mark.parametrize("family", ["gpt2", "gemma", "phi3"])
def test_family_trains_all_linear_and_adapter_loads_in_peft(tmp_path, family):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from swarm.adapters import load_peft_adapter, save_peft_adapter
    from swarm.backends.torch_lora import TorchLoraBackend

    d = _model_dir(tmp_path, family)
    shape = ModelShape.from_dir(d)  # the memory model understands every family's config
    assert estimate(shape, "lora", lora_r=4, lora_targets=None, micro_batch=1, seq_len=16).total > 0
    run = _run()  # target_modules omitted: every attention and MLP linear
    b = TorchLoraBackend(run, d, threads=1)
    leaves = {n.rsplit(".", 2)[-2] for n in b.adapter_names()}
    assert leaves == EXPECTED[family]
    before = b.get_adapter()
    batch = np.random.default_rng(0).integers(3, V, size=(2, 17)).astype(np.int64)
    r = b.train([batch])
    assert r.tokens == 32 and np.isfinite(r.loss_sum)
    b.apply_update(r.grads)
    after = b.get_adapter()
    assert any(not np.array_equal(before[k], after[k]) for k in after)
    for k, v in after.items():  # canonical layout: lora_A (r, in), lora_B (out, r), fp32
        assert v.dtype == np.float32 and (v.shape[0] == 4 if k.endswith("lora_A") else v.shape[1] == 4)

    out = tmp_path / "adapter"
    save_peft_adapter(out, after, run, d)
    assert load_peft_adapter(out).keys() == after.keys()
    assert all(np.array_equal(load_peft_adapter(out)[k], after[k]) for k in after)
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] == (family == "gpt2")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(d)), str(out))
    live = {n.replace("base_model.model.", "").replace(".default", "").removesuffix(".weight"): p
            for n, p in peft.named_parameters() if "lora_" in n}
    assert live.keys() == after.keys()
    for k, v in after.items():
        assert torch.equal(live[k].detach().float(), torch.from_numpy(v))
    ids = torch.from_numpy(batch[:, :-1])
    with torch.no_grad():
        ours = b.model.eval()(input_ids=ids).logits  # eval: GPT-2 has dropout
        theirs = peft.eval()(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_gpt2_config_keys_and_targets_matching_nothing(tmp_path):
    from transformers import GPT2Config

    shape = ModelShape.from_config(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4).to_dict())
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.intermediate_size, shape.head_dim) == (32, 3, 4, 128, 8)
    from swarm.backends.torch_lora import TorchLoraBackend

    d = _model_dir(tmp_path, "gpt2")
    with pytest.raises(SwarmError, match="matches lora.target_modules") as e:
        TorchLoraBackend(_run(("q_proj",)), d, threads=1)
    assert "\n" not in str(e.value)
    b = TorchLoraBackend(_run(("c_attn",)), d, threads=1)  # an explicit GPT-2 list works too
    assert {n.rsplit(".", 2)[-2] for n in b.adapter_names()} == {"c_attn"}
