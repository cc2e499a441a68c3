"""Training text, tokenization, and per-peer deterministic sampling.

The default corpus is the documentation text that ships with every CPython
(`pydoc_data.topics`): real English prose and code, on every machine, no download.
Sampling is a pure function of (seed, round, peer key): each peer trains different data, and
anyone can recompute which windows a peer used (the swarm-vs-single-process test does).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from swarm import SwarmError
from swarm.model import cache_root


def corpus_text(source: str) -> str:
    if source == "pydoc":
        import pydoc_data.topics as topics

        return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    p = Path(source).expanduser()
    if not p.is_file():
        raise SwarmError(f"data source not found: {p} (use 'pydoc' or a UTF-8 text file)")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SwarmError(f"data source {p} is not UTF-8 text") from None


def corpus_tokens(source: str, model_dir: Path) -> np.ndarray:
    """Token ids of the whole corpus (int32), cached per (text, tokenizer)."""
    text = corpus_text(source)
    tok_files = sorted(p for p in Path(model_dir).glob("tokenizer*") if p.is_file())
    h = hashlib.sha256(text.encode())
    for f in tok_files:
        h.update(f.read_bytes())
    cached = cache_root() / "corpus" / f"{h.hexdigest()[:16]}.npy"
    if cached.is_file():
        return np.load(cached)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{np.random.randint(1 << 30)}.npy")
    np.save(tmp, ids)
    tmp.replace(cached)
    return ids


def peer_key(peer_id: str) -> int:
    """A stable 64-bit integer from a peer id (seeds its sampling)."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "little")


def sample_batches(tokens: np.ndarray, seq_len: int, sequences: int, micro_batch: int,
                   seed: int, round_: int, key: int) -> list[np.ndarray]:
    """`sequences` random windows of seq_len+1 tokens, grouped in micro-batches (last may be short)."""
    if len(tokens) < seq_len + 2:
        raise SwarmError(f"corpus has {len(tokens)} tokens, fewer than one sequence of {seq_len}")
    rng = np.random.Generator(np.random.PCG64([seed, round_, key]))
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=sequences)
    windows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    return [windows[i:i + micro_batch] for i in range(0, sequences, micro_batch)]
