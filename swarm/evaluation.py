"""Held-out evaluation: which examples are never trained on, and one number the whole group records.

Why: training loss alone cannot tell learning from memorizing; a research run needs the loss of the
shared adapter on examples no peer ever trained on, and every peer must record the SAME number
(metrics from different peers are compared and plotted together).

The split (`holdout`) is a fixed rule on the example count alone — a permutation seeded by a
constant, not by a peer or the run's --seed — so every peer holds out the same examples of the
same data, and the training windows are cut only from the others (`swarm.datasets.load_run_data`).
One plain text (a single example) is split by tokens instead: its last fraction is held out.

When: every `data.eval_every` rounds the adapter after round R (R = 0, N, 2N, ...: the initial
adapter too) is evaluated at the start of round R+1, before training; the adapter is then still
exactly the committed state of round R on every member (training accumulates gradients, it applies
nothing). Each planned member evaluates its shard of the held-out windows (`eval_shard`, by its
place in the plan's order, like training shards) and puts (loss_sum, tokens) into the gather of
round R+1's all-reduce — the same group, the same signed announcements. Every member of that group
receives the same gathered records and sums them in shard order in float64 (`combine`): the same
operations on the same numbers, so every peer writes the same `eval_loss`, bit for bit, with
`eval_round` = R, in its row of round R+1.

If a shard is missing (a planned member left, or failed to evaluate) or a record is malformed, the
row omits eval_loss and eval_round rather than writing a partial or different number. Evaluation
never changes the adapter and never delays the all-reduce beyond its own compute, which the round's
deadline already bounds. With private data (`data.private`) each peer evaluates its own whole
held-out split and the group's figure is the token-weighted mean over the members' splits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from swarm import SwarmError

HOLDOUT_SEED = 0x5EED_E7A1  # a constant: the split depends on the data alone, the same on every peer
MAX_EVAL_TOKENS = 1 << 40


def holdout(n_examples: int, fraction: float) -> np.ndarray:
    """Sorted indices of the held-out examples: round(fraction * n) of them (at least one when fraction > 0),
    leaving at least one to train on."""
    if fraction <= 0:
        return np.zeros(0, np.int64)
    k = max(1, int(round(fraction * n_examples)))
    if k >= n_examples:
        raise SwarmError(f"data.eval_fraction {fraction:g} of {n_examples} examples leaves none to train on; "
                         f"lower it or add examples")
    perm = np.random.Generator(np.random.PCG64(HOLDOUT_SEED)).permutation(n_examples)
    return np.sort(perm[:k])


def split_tokens(tokens: np.ndarray, fraction: float, seq_len: int):
    """One token stream (a plain text): (training tokens, held-out windows). The last `fraction` of the
    tokens is held out, cut in non-overlapping windows of seq_len+1 tokens; training windows end before it."""
    from swarm.datasets import Tokenized

    cut = len(tokens) - int(round(fraction * len(tokens)))
    n = (len(tokens) - cut - 1) // seq_len
    if n < 1:
        raise SwarmError(f"data.eval_fraction {fraction:g} holds out {len(tokens) - cut} tokens, fewer than one "
                         f"sequence of {seq_len}: raise data.eval_fraction")
    if cut < seq_len + 2:
        raise SwarmError(f"data.eval_fraction {fraction:g} leaves {cut} tokens to train on, fewer than one sequence "
                         f"of {seq_len}: lower it")
    ids = np.stack([tokens[cut + w * seq_len: cut + w * seq_len + seq_len + 1] for w in range(n)]).astype(np.int64)
    return tokens[:cut], Tokenized(ids, np.ones((n, seq_len), np.uint8))


def eval_shard(n_windows: int, index: int, of: int) -> np.ndarray:
    """Held-out windows of the member at `index` of `of` (contiguous, sizes differing by at most one)."""
    return np.array_split(np.arange(n_windows), of)[index]


@dataclass(frozen=True)
class EvalResult:
    loss: float | None       # the group's mean loss per loss-carrying held-out token; None: incomplete
    tokens: int = 0
    reason: str = ""         # why there is no loss


def combine(parts: dict[str, Any], *, eval_round: int, plan_id: str, of: int,
            expected_tokens: list[int] | None) -> EvalResult:
    """The group's eval loss from its members' gathered parts (untrusted: each is checked). Complete only if
    shards 0..of-1 are each reported once; summed in shard order so every member gets the same float.
    `expected_tokens`: each shard's loss-carrying token count, known to every peer of a shared dataset
    (None: private data, each peer's own split)."""
    by_index: dict[int, tuple[float, int]] = {}
    for peer, p in sorted(parts.items()):
        if p is None:
            continue
        if not isinstance(p, dict) or p.get("round") != eval_round or p.get("plan") != plan_id or p.get("of") != of:
            return EvalResult(None, reason=f"peer {peer} evaluated something else: {str(p)[:100]}")
        i, loss, tokens = p.get("index"), p.get("loss_sum"), p.get("tokens")
        if type(i) is not int or not 0 <= i < of or i in by_index or type(tokens) is not int \
                or not 0 <= tokens <= MAX_EVAL_TOKENS or not isinstance(loss, float) or not math.isfinite(loss) \
                or loss < 0 or (expected_tokens is not None and tokens != expected_tokens[i]):
            return EvalResult(None, reason=f"peer {peer} sent a bad eval record: {str(p)[:100]}")
        by_index[i] = (loss, tokens)
    if len(by_index) != of:
        missing = sorted(set(range(of)) - set(by_index))
        return EvalResult(None, reason=f"shard(s) {missing} of {of} were not evaluated (their peers left the group)")
    total, tokens = 0.0, 0
    for i in range(of):
        total += by_index[i][0]
        tokens += by_index[i][1]
    if tokens == 0:
        return EvalResult(None, reason="the held-out split has no loss-carrying tokens")
    return EvalResult(total / tokens, tokens=tokens)


class Evaluation:
    """A peer's held-out split and schedule. `part` runs before a round's training; `row` after its commit."""

    def __init__(self, windows, every: int, private: bool = False) -> None:
        self.windows, self.every, self.private = windows, every, private  # windows: swarm.datasets.Tokenized | None
        self.sent: dict | None = None

    def eval_round(self, rnd: int) -> int | None:
        """The round whose committed adapter is evaluated at the start of round `rnd`, or None."""
        if self.windows is None or not self.every or (rnd - 1) % self.every:
            return None
        return rnd - 1

    def _shard(self, index: int, of: int) -> np.ndarray:
        return np.arange(len(self.windows.ids)) if self.private else eval_shard(len(self.windows.ids), index, of)

    def part(self, backend, plan, me: str, rnd: int, log=None) -> dict | None:
        """This peer's (loss_sum, tokens) on its shard, for the round's gather; None when not due or it failed."""
        from swarm.backends.base import Batch

        self.sent = None
        r = self.eval_round(rnd)
        if r is None or me not in plan.peer_ids:
            return None
        index, of = plan.peer_ids.index(me), len(plan.peer_ids)
        idx = self._shard(index, of)
        mb = max(1, plan.task_for(me).micro_batch)
        batches = [Batch(self.windows.ids[idx[i:i + mb]], self.windows.loss_mask[idx[i:i + mb]])
                   for i in range(0, len(idx), mb)]
        tokens = int(self.windows.loss_mask[idx].sum())
        try:
            loss_sum = float(backend.eval_loss(batches)) * tokens if batches else 0.0
        except Exception as e:  # never let evaluation break a round: the row omits eval_loss instead
            if log is not None:
                log.warn(f"evaluation failed ({type(e).__name__}: {e}); this round's row has no eval_loss", rnd)
            return None
        self.sent = {"round": r, "plan": plan.plan_id, "index": index, "of": of, "loss_sum": loss_sum, "tokens": tokens}
        return self.sent

    def row(self, outcome, plan, rnd: int, log=None) -> dict:
        """Metrics fields for the row of round `rnd`: eval_loss and eval_round when the group's figure is complete."""
        r = self.eval_round(rnd)
        if r is None:
            return {}
        of = len(plan.peer_ids)
        expected = None if self.private else [int(self.windows.loss_mask[eval_shard(len(self.windows.ids), i, of)].sum())
                                              for i in range(of)]
        res = combine({p: g.get("eval") if isinstance(g, dict) else None for p, g in outcome.gathered.items()},
                      eval_round=r, plan_id=plan.plan_id, of=of, expected_tokens=expected)
        if log is not None:
            log.say(f"eval loss {res.loss:.4f} on round {r}'s adapter ({res.tokens} held-out tokens, {of} shard(s))"
                    if res.loss is not None else f"no eval loss for round {r}'s adapter: {res.reason}", rnd)
        return {} if res.loss is None else {"eval_loss": res.loss, "eval_round": r}
