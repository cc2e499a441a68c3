"""python -m swarm.report DIR...: PNG plots of a run from its peers' metrics.jsonl files.

Why: a run leaves one JSON line per peer and round, and nobody reads hundreds of them to see whether
the loss falls, where a round's time goes, or what the negotiation decided. Each DIR is a peer's
`--output` directory or a directory holding several (a testbed's output root); the plots are written
to `--out` (default: DIR/plots of the first DIR) and their paths printed, one a line.

Reading is pure and unit-tested (`load_peers`, `time_split`, `events`); drawing uses matplotlib's
object API (`Figure`, rendered by Agg: no display, no pyplot global state), imported only here.
A round's time splits into: compute (training minus the pacer's idling), idle (the pacer keeping
compute under --max-utilization), waiting (for the group's last member to arrive), communication
(matchmaking and the all-reduce itself) and other (planning, failed attempts, commit and save).
Fields other helpers add (`eval_loss`/`eval_round`, `precision`) are drawn when rows have them.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from swarm import SwarmError
from swarm.cli import Parser
from swarm.metrics import read_metrics

PARTS = ("compute", "idle", "waiting", "communication", "other")
COLORS = {"compute": "#2f7ed8", "idle": "#c8c8c8", "waiting": "#f2a93b", "communication": "#8d4fc4", "other": "#7fbf7f"}
PLOTS = ("loss.png", "round_time.png", "plan.png", "throughput.png", "eval_loss.png")
EVENT_STYLE = {"membership": ("#555555", "--"), "rejected": ("#d62728", "-"), "fork": ("#9467bd", ":")}


@dataclass(frozen=True)
class PeerSeries:
    label: str          # the directory's name (peer0 in a testbed), or the peer id's prefix when names repeat
    peer_id: str
    rows: list[dict]    # metrics rows with a numeric round and time, sorted by round
    precision: str | None = None


@dataclass(frozen=True)
class Event:
    time: float         # seconds since the run's start (the earliest round's start over all peers)
    round: int
    kind: str           # membership | rejected | fork
    detail: str


def _num(row: dict, key: str) -> float | None:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def find_metrics(dirs: list[str | Path]) -> list[Path]:
    """DIR/metrics.jsonl, else DIR/*/metrics.jsonl (a testbed root), for each DIR."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise SwarmError(f"{d} is not a directory")
        try:
            files = [d / "metrics.jsonl"] if (d / "metrics.jsonl").is_file() else sorted(d.glob("*/metrics.jsonl"))
        except OSError as e:
            raise SwarmError(f"cannot read {d}: {e.strerror or e}") from None
        found += [f for f in files if f not in found]
    if not found:
        raise SwarmError(f"no metrics.jsonl in {', '.join(map(str, dirs))} (nor in their subdirectories)")
    return found


def load_peers(files: list[Path]) -> list[PeerSeries]:
    """One series per metrics file; rows without a numeric round and time are skipped."""
    loaded = []
    for f in files:
        try:
            raw = read_metrics(f)
        except OSError as e:
            raise SwarmError(f"cannot read {f}: {e.strerror or e}") from None
        rows = sorted((r for r in raw if isinstance(r, dict) and _num(r, "round") is not None and _num(r, "time") is not None),
                      key=lambda r: r["round"])
        if rows:
            peer = str(rows[-1].get("peer", ""))
            precisions = [str(r["precision"]) for r in rows if isinstance(r.get("precision"), str)]
            loaded.append((f.parent.name, peer, rows, precisions[-1] if precisions else None))
    if not loaded:
        raise SwarmError(f"no completed round in {', '.join(map(str, files))}")
    names = [name for name, *_ in loaded]
    return [PeerSeries(label=name if names.count(name) == 1 else f"{name}:{peer[:8]}", peer_id=peer, rows=rows,
                       precision=precision) for name, peer, rows, precision in loaded]


def run_start(peers: list[PeerSeries]) -> float:
    """Wall time when the earliest recorded round began."""
    return min(r["time"] - (_num(r, "seconds") or 0.0) for p in peers for r in p.rows)


def time_split(row: dict) -> dict[str, float]:
    """A round's seconds by part (see the module docstring); parts are clamped to be non-negative."""
    total = _num(row, "seconds") or 0.0
    train = _num(row, "train_seconds") or 0.0
    idle = min(_num(row, "idle_seconds") or 0.0, train)
    reduce = _num(row, "wait_seconds") or 0.0
    waiting = min(_num(row, "barrier_wait_seconds") or 0.0, reduce)
    return {"compute": train - idle, "idle": idle, "waiting": waiting, "communication": reduce - waiting,
            "other": max(0.0, total - train - reduce)}


def events(peers: list[PeerSeries]) -> list[Event]:
    """Group membership changes, newly rejected peers and lost fork work, once per (kind, round, detail)."""
    start = run_start(peers) if peers else 0.0
    seen: dict[tuple[str, int, str], float] = {}

    def note(kind: str, row: dict, detail: str) -> None:
        key = (kind, int(row["round"]), detail)
        seen[key] = min(seen.get(key, math.inf), row["time"] - start)

    for p in peers:
        prev_members: set[str] | None = None
        prev_excluded: set[str] = set()
        for r in p.rows:
            members = {str(m) for m in r.get("members") or [] if isinstance(m, str)}
            excluded = {str(m) for m in r.get("excluded") or [] if isinstance(m, str)}
            if prev_members is not None and members and members != prev_members:
                change = [f"+{m[:8]}" for m in sorted(members - prev_members)] + [f"-{m[:8]}" for m in sorted(prev_members - members)]
                note("membership", r, " ".join(change))
            for m in sorted(excluded - prev_excluded):
                note("rejected", r, m[:8])
            if (_num(r, "lost_rounds") or 0) > 0:
                note("fork", r, f"{p.label} lost {int(r['lost_rounds'])} round(s)")
            prev_members, prev_excluded = members or prev_members, excluded
    return sorted((Event(time=t, round=k[1], kind=k[0], detail=k[2]) for k, t in seen.items()),
                  key=lambda e: (e.time, e.kind, e.detail))


# ----------------------------------------------------------------------------------------- drawing
def _label(p: PeerSeries) -> str:
    return f"{p.label} ({p.precision})" if p.precision else p.label


def _series(p: PeerSeries, x: str, y: str, start: float = 0.0) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in p.rows:
        xv = r["time"] - start if x == "time" else _num(r, x)
        yv = _num(r, y)
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def _mark_events(ax, evs: list[Event]) -> None:
    labelled = set()
    for e in evs:
        color, style = EVENT_STYLE[e.kind]
        ax.axvline(e.time, color=color, linestyle=style, linewidth=1,
                   label=None if e.kind in labelled else {"membership": "group changed", "rejected": "contribution rejected",
                                                          "fork": "fork: work lost"}[e.kind])
        labelled.add(e.kind)
        ax.annotate(e.detail, (e.time, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=6,
                    va="top", ha="right", color=color)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def draw(peers: list[PeerSeries], out: Path) -> list[Path]:
    """Write the plots into `out`; the paths, in a fixed order."""
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    for stale in PLOTS:  # a plot this run does not draw (no eval rows) must not be left from an earlier one
        (out / stale).unlink(missing_ok=True)
    start, evs, paths = run_start(peers), events(peers), []

    fig = Figure(figsize=(12, 4.5))
    by_tokens, by_time = fig.subplots(1, 2)
    for p in peers:
        xs, ys = _series(p, "work", "loss")
        if not xs:  # rows from before `work` existed: the swarm's tokens, summed
            xs, ys = _cumulative(p)
        by_tokens.plot(xs, ys, marker=".", label=_label(p))
        by_time.plot(*_series(p, "time", "loss", start), marker=".", label=_label(p))
    _mark_events(by_time, evs)
    by_tokens.set(title="training loss vs tokens trained by the swarm", xlabel="tokens", ylabel="loss")
    by_time.set(title="training loss vs wall time", xlabel="seconds since the first round began", ylabel="loss")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / "loss.png"))

    fig = Figure(figsize=(12, 2.4 * len(peers) + 0.8))
    axes = fig.subplots(len(peers), 1, sharex=True, squeeze=False)[:, 0]
    for ax, p in zip(axes, peers):
        rounds = [int(r["round"]) for r in p.rows]
        bottom = [0.0] * len(rounds)
        for part in PARTS:
            heights = [time_split(r)[part] for r in p.rows]
            ax.bar(rounds, heights, bottom=bottom, color=COLORS[part], label=part, width=0.8)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set(title=f"{_label(p)}: where each round's time went", ylabel="seconds")
        ax.grid(alpha=0.3, axis="y")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, ncol=len(PARTS), loc="upper center")
    axes[-1].set_xlabel("round")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(out / "round_time.png", dpi=110)
    paths.append(out / "round_time.png")

    fig = Figure(figsize=(12, 6))
    quota, micro = fig.subplots(2, 1, sharex=True)
    for p in peers:
        quota.step(*_series(p, "round", "quota_tokens"), where="mid", marker=".", label=_label(p))
        micro.step(*_series(p, "round", "micro_batch"), where="mid", marker=".", label=_label(p))
    quota.set(title="negotiated token quota per round", ylabel="tokens")
    micro.set(title="planned micro-batch per round (at most what fits the peer's memory)", ylabel="sequences", xlabel="round")
    for ax in (quota, micro):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / "plan.png"))

    fig = Figure(figsize=(12, 4.5))
    ax = fig.subplots()
    for p in peers:
        ax.plot(*_series(p, "time", "tokens_per_s", start), marker=".", label=_label(p))
    _mark_events(ax, evs)
    ax.set(title="tokens/s per peer (tokens trained / round wall time)", xlabel="seconds since the first round began",
           ylabel="tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "throughput.png"))

    evals = [(p, _series(p, "eval_round" if any("eval_round" in r for r in p.rows) else "round", "eval_loss")) for p in peers]
    if any(xs for _, (xs, _) in evals):
        fig = Figure(figsize=(8, 4.5))
        ax = fig.subplots()
        for p, (xs, ys) in evals:
            if xs:
                ax.plot(xs, ys, marker="o", label=_label(p))
        ax.set(title="held-out loss", xlabel="round", ylabel="eval loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / "eval_loss.png"))
    return paths


def _cumulative(p: PeerSeries) -> tuple[list[float], list[float]]:
    xs, ys, total = [], [], 0.0
    for r in p.rows:
        total += _num(r, "group_tokens") or 0.0
        if _num(r, "loss") is not None:
            xs.append(total)
            ys.append(r["loss"])
    return xs, ys


def report(dirs: list[str | Path], out: Path | None = None) -> list[Path]:
    """Find, read and draw: the plots' paths. SwarmError (one line) when there is nothing to draw."""
    peers = load_peers(find_metrics(dirs))
    target = Path(out) if out is not None else Path(dirs[0]) / "plots"
    try:
        return draw(peers, target)
    except OSError as e:
        raise SwarmError(f"cannot write plots to {target}: {e.strerror or e}") from None


def main(argv=None) -> int:
    ap = Parser(prog="python -m swarm.report", description=__doc__.splitlines()[0].split(": ", 1)[1])
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="a peer's --output directory, or a directory of them (a testbed's)")
    ap.add_argument("--out", default=None, help="where the PNGs go (default: DIR/plots of the first DIR)")
    args = ap.parse_args(argv)
    began = time.monotonic()
    try:
        paths = report(args.dirs, Path(args.out) if args.out else None)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    print(f"{len(paths)} plots in {time.monotonic() - began:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
