"""Instruction, chat and plain-text datasets: read, tokenize with a loss mask, pack or pad.

Why: people fine-tune adapters on their own instruction or chat data, in the formats the tools
they know take (mlx-lm's LoRA trainer, HF/TRL): JSONL with `{"text"}`, `{"prompt","completion"}`
or `{"messages": [...]}`, plain UTF-8 text, or a parquet file / HF `datasets` save_to_disk
directory (read with pyarrow, no `datasets` package). Training on a prompt teaches the adapter to
write prompts, so only completions and assistant turns carry loss: every example becomes token
ids plus a 0/1 mask of the same length, and the tokens that weight the swarm's average are the
tokens whose mask is 1.

A run names its data by content (`file_sha256`), never by a path: each peer passes its own copy
and checks it against the hash. Bad data is a one-line `SwarmError` naming the file, the line
(1-based, JSONL) or row (parquet), and the fix; nothing is trained on a file that fails.

Windows: `pack` concatenates examples (each ending in EOS) and cuts windows of seq_len+1 tokens;
`pad` gives each example its own window, truncated or padded with masked pad tokens. A window's
`loss_mask[t]` says whether the prediction of token t+1 from tokens ≤ t counts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from swarm import SwarmError

Format = Literal["text", "jsonl", "parquet"]


@dataclass(frozen=True)
class Example:
    """One training example as a list of (text, carries_loss) segments, in order."""

    segments: tuple[tuple[str, bool], ...]
    messages: tuple[dict, ...] | None = None  # chat examples: rendered with the chat template
    where: str = ""                           # "FILE line N" for error messages


@dataclass(frozen=True)
class Tokenized:
    """Windows ready for a backend: ids (n, seq_len+1) int64, loss_mask (n, seq_len) uint8."""

    ids: np.ndarray
    loss_mask: np.ndarray

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (sorted relative names and bytes)."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def verify_hash(path: Path, expected: str) -> None:
    got = file_sha256(path)
    if got != expected:
        raise SwarmError(f"{path}: sha256 {got[:16]}… is not the run's dataset {expected[:16]}…; "
                         f"pass --data with the run's exact file")


BUILTIN_SOURCES = ("pydoc",)


def network_paths(config: dict) -> list[str]:
    """The local paths a run config taken from the network would make this peer open (data source,
    model directory). A joiner never opens them: a stranger's run record could name a private file,
    which would be tokenized, trained on and its gradients sent to the swarm (issue 18, "lure")."""
    out = []
    data, model = config.get("data") or {}, config.get("model") or {}
    if isinstance(data, dict) and data.get("source", "pydoc") not in BUILTIN_SOURCES and data.get("private") is not True:
        out.append(f"data.source={str(data.get('source'))[:80]!r}")
    if isinstance(model, dict) and model.get("path") is not None:
        out.append(f"model.path={str(model.get('path'))[:80]!r}")
    return out


PRIVATE_SOURCE = "private"  # what a private run's record says instead of its creator's path


def record_config(run) -> dict:
    """The run's config as its record publishes it: a private run names no source path and no hash; a dataset
    named by its hash only by its file name (joiners bring their own copy; the creator's directories stay private)."""
    config = run.model_dump(mode="json")
    if run.data.private:
        config["data"].update(source=PRIVATE_SOURCE, sha256=None)
    elif run.data.sha256 and run.data.source not in BUILTIN_SOURCES:
        config["data"]["source"] = Path(run.data.source).name
    return config


def local_data(run, data: Path | None, from_network: bool):
    """The run as this peer trains it: its data read from `data` (the peer's --data), the only data
    path a peer opens besides its own --config's. Pure: it opens nothing (the hash is checked by
    load_windows before any tokenizing, and `data_sha256` below is only called for a run of one's own).

    From the network (a record): the builtin corpus, or a dataset named by sha256 that --data must
    supply; a record's data.source is never opened. From one's own config: --data replaces the
    source and, if the config names no hash, its hash is the file's (so joiners can verify theirs).
    Private data (data.private): every peer brings its own; nothing is hashed or compared."""
    d = run.data
    if d.private:
        if data is None and (from_network or d.source in BUILTIN_SOURCES):
            raise SwarmError(f"run {run.name!r} trains on each peer's private data (data.private): "
                             f"pass --data PATH with this peer's own dataset")
        source = str(data) if data is not None else d.source
        return run.model_copy(update={"data": d.model_copy(update={"source": source, "sha256": None})})
    named = d.source not in BUILTIN_SOURCES or d.sha256 is not None
    if from_network:
        if not named:
            if data is not None:
                raise SwarmError(f"run {run.name!r} trains on the builtin corpus {d.source!r}: drop --data")
            return run
        if d.sha256 is None:
            raise SwarmError(f"run {run.name!r} names its data by a path, not by content hash; this peer never opens "
                             f"a path taken from the network: pass --config with your own copy of the run")
        if data is None:
            raise SwarmError(f"run {run.name!r} trains on dataset {d.sha256[:12]} ({d.format}): pass --data PATH")
        return run.model_copy(update={"data": d.model_copy(update={"source": str(data)})})
    if data is None:
        return run
    sha = d.sha256 or file_sha256(data)
    return run.model_copy(update={"data": d.model_copy(update={"source": str(data), "sha256": sha})})


def detect_format(path: Path) -> Format:
    p = Path(path)
    if p.is_dir() or p.suffix == ".parquet":
        return "parquet"
    if p.suffix in (".jsonl", ".json"):
        return "jsonl"
    return "text"


def _record_example(rec: Any, where: str) -> Example:
    if not isinstance(rec, dict):
        raise SwarmError(f"{where}: expected a JSON object with \"text\", \"prompt\"+\"completion\" "
                         f"or \"messages\"; fix that line")
    if "messages" in rec:
        msgs = rec["messages"]
        if (not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise SwarmError(f"{where}: \"messages\" must be a non-empty list of "
                             f"{{\"role\": str, \"content\": str}}; fix that line")
        if not any(m["role"] == "assistant" for m in msgs):
            raise SwarmError(f"{where}: no assistant turn, so nothing carries loss; "
                             f"add one or drop that line")
        return Example(segments=(), messages=tuple({"role": m["role"], "content": m["content"]} for m in msgs),
                       where=where)
    if "prompt" in rec or "completion" in rec:
        p, c = rec.get("prompt"), rec.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            raise SwarmError(f"{where}: \"prompt\" and \"completion\" must both be strings; fix that line")
        if not c:
            raise SwarmError(f"{where}: empty \"completion\", nothing carries loss; fix or drop that line")
        return Example(segments=((p, False), (c, True)), where=where)
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise SwarmError(f"{where}: \"text\" must be a non-empty string; fix that line")
        return Example(segments=((rec["text"], True),), where=where)
    raise SwarmError(f"{where}: missing fields: expected \"text\", \"prompt\"+\"completion\" or "
                     f"\"messages\" (got {sorted(rec)[:5]}); fix that line")


def read_examples(path: Path, fmt: Format | None = None) -> list[Example]:
    """Every example of a local file, validated; a one-line SwarmError on the first bad one."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SwarmError(f"data file not found: {p}; pass --data with an existing file")
    fmt = fmt or detect_format(p)
    if fmt == "text":
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError):
            raise SwarmError(f"{p}: not a UTF-8 text file; pass a text, JSONL or parquet file") from None
        if not text.strip():
            raise SwarmError(f"{p}: empty; pass a file with text in it")
        return [Example(segments=((text, True),), where=str(p))]
    if fmt == "jsonl":
        out = []
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise SwarmError(f"{p}: not UTF-8; save it as UTF-8 JSONL") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{p} line {i}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SwarmError(f"{where}: malformed JSON ({e.msg}); one JSON object per line") from None
            out.append(_record_example(rec, where))
        if not out:
            raise SwarmError(f"{p}: no examples; one JSON object per line")
        return out
    return _read_parquet(p)


def _read_parquet(p: Path) -> list[Example]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SwarmError("reading parquet needs pyarrow: pip install -e '.[data]'") from None
    files = sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
    if p.is_dir() and not files:
        files = sorted(p.rglob("*.arrow"))
    if not files:
        raise SwarmError(f"{p}: no .parquet or .arrow files; pass a parquet file or a "
                         f"datasets.save_to_disk directory")
    out = []
    for f in files:
        try:
            if f.suffix == ".arrow":
                import pyarrow as pa
                with pa.memory_map(str(f)) as src:
                    try:
                        table = pa.ipc.open_stream(src).read_all()
                    except pa.ArrowInvalid:
                        table = pa.ipc.open_file(src).read_all()
            else:
                table = pq.read_table(f)
        except Exception as e:  # pyarrow raises many types for a bad file
            raise SwarmError(f"{f}: not readable as parquet/arrow ({type(e).__name__}); "
                             f"pass a valid file") from None
        for i, rec in enumerate(table.to_pylist(), 1):
            out.append(_record_example(rec, f"{f} row {i}"))
    if not out:
        raise SwarmError(f"{p}: no rows")
    return out


def _segments(ex: Example, tokenizer) -> tuple[tuple[str, bool], ...]:
    if ex.messages is None:
        return ex.segments
    if not getattr(tokenizer, "chat_template", None):
        raise SwarmError(f"{ex.where}: chat \"messages\" need a model whose tokenizer has a chat "
                         f"template, and this one has none; use prompt/completion records")
    # Render the conversation prefix by prefix: the text added by an assistant turn carries loss.
    segs, prev = [], ""
    msgs = list(ex.messages)
    for k, m in enumerate(msgs):
        full = tokenizer.apply_chat_template(msgs[:k + 1], tokenize=False)
        if not full.startswith(prev):
            raise SwarmError(f"{ex.where}: this model's chat template is not prefix-stable; "
                             f"use prompt/completion records")
        segs.append((full[len(prev):], m["role"] == "assistant"))
        prev = full
    return tuple(segs)


def tokenize_example(ex: Example, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and a same-length 0/1 mask (1: the token is a target that carries loss)."""
    ids, mask = [], []
    for text, loss in _segments(ex, tokenizer):
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += t
        mask += [int(loss)] * len(t)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(mask[-1] if mask else 0)  # EOS is learned after a completion, not after a prompt
    if not any(mask):
        raise SwarmError(f"{ex.where}: empty after masking (no token carries loss); fix that line")
    return ids, mask


def windows(examples: list[Example], tokenizer, seq_len: int,
            packing: Literal["pack", "pad"] = "pack") -> Tokenized:
    """All windows of a dataset. `loss_mask[w, t]` masks the target ids[w, t+1]."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows_ids, rows_mask = [], []
    if packing == "pack":
        ids, mask = [], []
        for ex in examples:
            i, m = tokenize_example(ex, tokenizer)
            ids += i
            mask += m
        n = (len(ids) - 1) // seq_len
        if n < 1:
            raise SwarmError(f"dataset has {len(ids)} tokens, fewer than one sequence of {seq_len}")
        a, m = np.asarray(ids, np.int64), np.asarray(mask, np.uint8)
        for w in range(n):
            rows_ids.append(a[w * seq_len: w * seq_len + seq_len + 1])
            rows_mask.append(m[w * seq_len + 1: w * seq_len + seq_len + 1])
    else:
        for ex in examples:
            i, m = tokenize_example(ex, tokenizer)
            i, m = i[:seq_len + 1], m[:seq_len + 1]
            a = np.full(seq_len + 1, pad, np.int64)
            mm = np.zeros(seq_len + 1, np.uint8)
            a[:len(i)], mm[:len(m)] = i, m
            if not mm[1:].any():
                raise SwarmError(f"{ex.where}: empty after masking at seq_len {seq_len} (the prompt "
                                 f"fills the window); shorten the prompt or raise train.seq_len")
            rows_ids.append(a)
            rows_mask.append(mm[1:])
    out = Tokenized(np.stack(rows_ids), np.stack(rows_mask))
    if out.loss_tokens == 0:
        raise SwarmError("dataset is empty after masking (no token carries loss)")
    return out


def round_shard(n_windows: int, seed: int, round_: int, member_index: int, quotas: list[int]) -> np.ndarray:
    """Window indices for one member this round: a permutation seeded by (seed, round), cut in the
    plan's order by the members' quotas (in windows), so members of a round never share a window
    (until a round asks for more windows than the dataset has: then it wraps)."""
    rng = np.random.Generator(np.random.PCG64([seed, round_]))
    total = sum(quotas)
    perm = np.concatenate([rng.permutation(n_windows) for _ in range(-(-total // n_windows))])
    start = sum(quotas[:member_index])
    return perm[start:start + quotas[member_index]]


def load_windows(source: str, fmt: str, packing: str, sha256: str | None, tokenizer_dir: Path,
                 seq_len: int, eval_fraction: float = 0.0) -> tuple[Tokenized, Tokenized | None]:
    """A local dataset's (training windows, held-out windows or None), after checking its content hash (when
    the run names one). Held out: the examples `swarm.evaluation.holdout` picks, windowed on their own so no
    window mixes the two; one example alone (a plain text) holds out its last windows instead."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from swarm.evaluation import holdout

    p = Path(source).expanduser()
    if not p.exists():
        raise SwarmError(f"data file not found: {p}; pass an existing file")
    if sha256 is not None:
        verify_hash(p, sha256)
    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    examples = read_examples(p, None if fmt == "auto" else fmt)  # type: ignore[arg-type]
    if not eval_fraction:
        return windows(examples, tok, seq_len, packing), None  # type: ignore[arg-type]
    if len(examples) == 1:
        every = windows(examples, tok, seq_len, packing)  # type: ignore[arg-type]
        held = holdout(len(every.ids), eval_fraction)
        k = len(every.ids) - len(held)  # the last windows: contiguous text, never overlapping the training ones
        return (Tokenized(every.ids[:k], every.loss_mask[:k]),
                Tokenized(every.ids[k:], every.loss_mask[k:]))
    held = set(holdout(len(examples), eval_fraction).tolist())
    train = windows([e for i, e in enumerate(examples) if i not in held], tok, seq_len, packing)  # type: ignore[arg-type]
    try:
        return train, windows([examples[i] for i in sorted(held)], tok, seq_len, packing)  # type: ignore[arg-type]
    except SwarmError as e:
        raise SwarmError(f"held-out split of {p} (data.eval_fraction {eval_fraction:g}): {e}; "
                         f"raise data.eval_fraction") from None


@dataclass(frozen=True)
class RunData:
    """What a peer trains and evaluates on."""

    windows: Tokenized | None    # masked training windows of a dataset; None: raw corpus tokens
    tokens: np.ndarray           # raw corpus tokens to sample (for a dataset: its windows, for the speed probe)
    held_out: Tokenized | None   # held-out windows (data.eval_fraction), never trained on


def load_run_data(d, model_dir: Path, seq_len: int) -> RunData:
    """The run's data (`DataConfig` d) as a peer trains it: raw text (the builtin corpus, or an unnamed plain
    text file) is sampled as a token stream; anything else is a dataset of masked windows."""
    from swarm.data import corpus_tokens
    from swarm.evaluation import split_tokens

    p = Path(d.source)
    if d.source in BUILTIN_SOURCES or (d.format in ("auto", "text") and d.sha256 is None and not d.private
                                       and p.suffix not in (".jsonl", ".json", ".parquet") and not p.is_dir()):
        tokens = corpus_tokens(d.source, model_dir)
        if not d.eval_fraction:
            return RunData(None, tokens, None)
        train, held = split_tokens(tokens, d.eval_fraction, seq_len)
        return RunData(None, train, held)
    train, held = load_windows(d.source, d.format, d.packing, d.sha256, model_dir, seq_len, d.eval_fraction)
    return RunData(train, np.tile(train.ids.reshape(-1), 2), held)  # unmasked windows for the speed probe


def shard_batches(data: Tokenized, plan, peer_id: str, seed: int, round_: int) -> list:
    """This peer's masked micro-batches for a round: its `round_shard` of a shared dataset, cut by the
    plan's order (tasks sorted by peer id) and quotas, so the round's peers train different windows."""
    from swarm.backends.base import Batch

    order = plan.peer_ids
    task = plan.tasks[order.index(peer_id)]
    idx = round_shard(len(data.ids), seed, round_, order.index(peer_id), [t.sequences for t in plan.tasks])
    return [Batch(data.ids[idx[i:i + task.micro_batch]], data.loss_mask[idx[i:i + task.micro_batch]])
            for i in range(0, len(idx), task.micro_batch)]


def sample_windows(data: Tokenized, sequences: int, micro_batch: int, seed: int, round_: int, key: int) -> list:
    """`sequences` windows drawn per (seed, round, peer key), as masked micro-batches."""
    from swarm.backends.base import Batch

    rng = np.random.Generator(np.random.PCG64([seed, round_, key]))
    idx = rng.integers(0, len(data.ids), size=sequences)
    return [Batch(data.ids[idx[i:i + micro_batch]], data.loss_mask[idx[i:i + micro_batch]])
            for i in range(0, sequences, micro_batch)]
