"""Base models: the embedded default (built locally, deterministically) and local HF directories.

The default model's weights come from numpy's PCG64 generator, not from a framework's RNG, so
the same seed gives the same bytes on every peer whatever its backend (torch or MLX) or device.
It is written once as an ordinary Hugging Face directory (config.json, model.safetensors,
tokenizer) that transformers, peft and mlx-lm all load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from swarm import SwarmError
from swarm.config import BuiltinModel, ModelConfig

WEIGHTS = "model.safetensors"
HASH_FILE = "swarm_base_sha256.txt"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def cache_root() -> Path:
    """Where generated models and measured figures are kept (SWARM_CACHE overrides)."""
    return Path(os.environ.get("SWARM_CACHE", Path.home() / ".cache" / "swarm"))


def _llama_config_dict(b: BuiltinModel) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": b.vocab_size,
        "hidden_size": b.hidden_size,
        "intermediate_size": b.intermediate_size,
        "num_hidden_layers": b.num_hidden_layers,
        "num_attention_heads": b.num_attention_heads,
        "num_key_value_heads": b.num_key_value_heads,
        "max_position_embeddings": b.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def _weight_shapes(b: BuiltinModel) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama model, without any framework."""
    h, i, v = b.hidden_size, b.intermediate_size, b.vocab_size
    head = h // b.num_attention_heads
    kv = head * b.num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(b.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


def generate_weights(b: BuiltinModel) -> dict[str, np.ndarray]:
    """The default model's weights: a pure function of its config (names visited in sorted order)."""
    if b.hidden_size % b.num_attention_heads or b.num_attention_heads % b.num_key_value_heads:
        raise SwarmError("builtin model: hidden_size must divide by heads, and heads by key/value heads")
    rng = np.random.Generator(np.random.PCG64(b.seed))
    out = {}
    for name, shape in sorted(_weight_shapes(b).items()):
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, dtype=np.float32)
        else:
            std = 0.02 if "embed" in name or "lm_head" in name else 1.0 / np.sqrt(shape[-1])
            out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return out


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """Hash of named tensors: sorted names, dtype, shape and little-endian bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def _write_tokenizer(directory: Path) -> None:
    """A byte-level tokenizer (256 bytes + 4 specials) that needs no download to build or load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    byte_chars.sort(key=lambda c: _BYTE_OF[c])
    vocab = {tok: n for n, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + n for n, c in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte <-> printable character map (what ByteLevel uses).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def builtin_dir(b: BuiltinModel) -> Path:
    key = hashlib.sha256(json.dumps(b.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "models" / f"builtin-{key}"


def ensure_builtin(b: BuiltinModel) -> Path:
    """Write the embedded model's directory once (atomically) and return it."""
    target = builtin_dir(b)
    if (target / HASH_FILE).is_file():
        return target
    from safetensors.numpy import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        weights = generate_weights(b)
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_llama_config_dict(b), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
        _write_tokenizer(tmp)
        (tmp / HASH_FILE).write_text(tensors_sha256(weights) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(m: ModelConfig) -> Path:
    """The local directory of the run's base model; SwarmError if it is not usable."""
    if m.path is None:
        return ensure_builtin(m.builtin)
    d = Path(m.path).expanduser()
    if not (d / "config.json").is_file():
        raise SwarmError(f"model path {d} is not a model directory (no config.json there)")
    if not any(d.glob("*.safetensors")):
        raise SwarmError(f"model path {d} has no *.safetensors weights")
    return d


def load_base_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """All safetensors weights of a model directory as float32 numpy arrays."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def base_sha256(model_dir: Path) -> str:
    """Hash of the base weights (cached beside them); equal on every peer with the same base."""
    cached = model_dir / HASH_FILE
    if cached.is_file():
        return cached.read_text().strip()
    digest = tensors_sha256(load_base_weights(model_dir))
    try:
        cached.write_text(digest + "\n")
    except OSError:
        pass  # read-only model directory: hash again next time
    return digest
