"""python -m swarm.status: the swarm as a table, without joining training.

Reads the runs, capability adverts and progress records from the DHT (all validated), and shows
per run the plan every peer derives for its next round. `--json` prints the same, stable for scripts:
  {"time": float, "runs": [{"name", "model", "params", "base_sha256", "fingerprint", "transport", "round",
    "plan": RoundPlan.to_dict(), "peers": [{"peer_id", "tier", "backend", "device", "memory_usable_bytes",
    "memory_total_bytes", "tokens_per_s", "max_utilization", "max_micro_batch", "micro_batch", "quota_tokens",
    "round", "last_seen_s", "state", "loss", "precision", "excluded", "why"}]}]}
A peer's state is training, waiting (not in the next plan), joining, paused, leaving, excluded (the plan leaves it
out for what it advertises: it fits no precision the run allows in its memory, runs none of them, or has no
speed; `excluded` is the planner's reason code, `why` its one line), or banned: its records fail validation, so
every peer drops them and no plan includes it (`why` says what is wrong with them). The table lists each
excluded or banned peer's `why` under it.
`--serve` shows the same live in a browser (swarm.dashboard).
"""

from __future__ import annotations

import json
import sys
import time

from swarm.cli import Parser
from swarm import SwarmError
from swarm.transport.factory import TRANSPORTS, address_mismatch, make_transport


#: The planner's reasons that say a peer cannot take part as it is (not that it is pausing, loading or starting later).
EXCLUDED = ("no_precision", "precision_not_allowed", "does_not_fit", "no_throughput")


def collect(members, now: float) -> dict:
    from swarm.config import RunConfig
    from swarm.planner import plan_round

    runs = []
    for name, rec in sorted(members.runs().items()):
        members.rejected.clear()
        adverts = members.adverts(name)
        progress = {p.peer_id: p for p in members.progress(name)}
        banned = dict(members.rejected)  # owner -> why every peer drops its records
        current = max((p.round for p in progress.values()), default=0)
        try:
            plan = plan_round(RunConfig.model_validate(rec.config), adverts, current + 1)
            plan_dict = plan.to_dict()
        except Exception as e:  # a run we cannot plan is still shown
            plan, plan_dict = None, {"error": str(e)}
        peers = []
        for a in sorted(adverts, key=lambda a: a.peer_id):
            task = plan.task_for(a.peer_id) if plan is not None else None
            p = progress.get(a.peer_id)
            state = "paused" if a.paused else (p.state if p else "joining")
            if task is None and state == "training":
                state = "waiting"
            ex = plan.exclusion_for(a.peer_id) if plan is not None else None
            if ex is not None and ex.reason in EXCLUDED:
                state = "excluded"
            if a.peer_id in banned:
                state = "banned"
            peers.append({
                "peer_id": a.peer_id, "tier": a.tier, "backend": a.backend, "device": a.device,
                "precision": getattr(a, "precision", None),
                "memory_usable_bytes": a.memory_usable_bytes, "memory_total_bytes": a.memory_total_bytes,
                "tokens_per_s": a.throughput_tokens_per_s, "max_utilization": a.max_utilization,
                "max_micro_batch": a.max_micro_batch, "micro_batch": task.micro_batch if task else 0,
                "quota_tokens": task.quota_tokens if task else 0, "round": p.round if p else 0,
                "last_seen_s": round(max(0.0, now - max(a.timestamp, p.timestamp if p else 0.0)), 1),
                "state": state, "loss": p.loss if p else None, "excluded": ex.reason if ex else None,
                "why": banned.get(a.peer_id) or (ex.detail if state == "excluded" else None),
            })
        shown = {a.peer_id for a in adverts}
        peers += [_banned_only(peer, why) for peer, why in sorted(banned.items()) if peer not in shown]
        runs.append({"name": name, "model": rec.model, "params": rec.params, "base_sha256": rec.base_sha256,
                     "fingerprint": rec.fingerprint, "transport": rec.transport, "round": current, "plan": plan_dict, "peers": peers})
    return {"time": now, "runs": runs}


# The table's columns, most important first: when the terminal (or a pipe, 80 columns) is too narrow
# for all of them, columns are dropped from the end of this list, never squeezed to "…".
COLUMNS: list[tuple[str, str, object]] = [  # header, justify, cell
    ("peer", "left", lambda p: p["peer_id"][:8]),
    ("state", "left", lambda p: p["state"]),
    ("tier", "left", lambda p: p["tier"]),
    ("backend", "left", lambda p: p["backend"] + (f"/{p['precision']}" if p.get("precision") else "")),
    ("memory", "right", lambda p: f"{p['memory_usable_bytes'] / 1e9:.1f}G"),
    ("quota", "right", lambda p: str(p["quota_tokens"])),
    ("loss", "right", lambda p: f"{p['loss']:.4f}" if p["loss"] is not None else "-"),
    ("round", "right", lambda p: str(p["round"])),
    ("tok/s", "right", lambda p: f"{p['tokens_per_s']:.0f}"),
    ("mb", "right", lambda p: str(p["micro_batch"])),
    ("seen", "right", lambda p: f"{p['last_seen_s']:.0f}s" if p["last_seen_s"] is not None else "-"),
    ("util", "right", lambda p: f"{p['max_utilization']:.2f}"),
]


def table(run: dict, console):
    """One run's table, with as many of COLUMNS as fit the console's width."""
    from rich import box
    from rich.table import Table

    cells = [[str(cell(p)) for _, _, cell in COLUMNS] for p in run["peers"]]

    def build(keep: int) -> Table:
        t = Table(title=f"run {run['name']}: {run['model']} ({run['params'] / 1e6:.1f}M), round {run['round']}, "
                        f"{len(run['peers'])} peers, next plan {run['plan'].get('plan_id', '-')}",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
        for header, justify, _ in COLUMNS[:keep]:
            t.add_column(header, justify=justify, no_wrap=True)
        for row in cells:
            t.add_row(*row[:keep])
        if keep < len(COLUMNS):
            t.caption = f"(narrow: {', '.join(h for h, _, _ in COLUMNS[keep:])} not shown; --json has all)"
        return t

    keep = len(COLUMNS)
    wide = console.options.update(width=10_000)
    while keep > 1 and console.measure(build(keep), options=wide).maximum > console.width:
        keep -= 1
    return build(keep)


def _banned_only(peer: str, why: str) -> dict:
    """A peer known only by records the swarm drops (every peer does: it is planned in by nobody)."""
    return {"peer_id": peer, "tier": "-", "backend": "-", "device": "-", "precision": None, "memory_usable_bytes": 0,
            "memory_total_bytes": 0, "tokens_per_s": 0.0, "max_utilization": 0.0, "max_micro_batch": 0, "micro_batch": 0,
            "quota_tokens": 0, "round": 0, "last_seen_s": None, "state": "banned", "loss": None, "excluded": None, "why": why}


def render(snapshot: dict, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    if not snapshot["runs"]:
        console.print("no runs in this swarm yet")
    for run in snapshot["runs"]:
        console.print(table(run, console))
        for p in run["peers"]:  # the reason in full, one line each (the table is too narrow for it)
            if p.get("why") and p["state"] in ("excluded", "banned"):
                console.print(f"{p['peer_id'][:8]} {p['state']}: {p['why']}", soft_wrap=True, highlight=False, markup=False)


def main(argv=None) -> int:
    ap = Parser(prog="python -m swarm.status", description="Show a swarm's runs and peers without joining training.")
    ap.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR", help="any live peer's multiaddr")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--swarm-key", default=None, metavar="FILE", help="the key of a private swarm (to read its records)")
    ap.add_argument("--transport", choices=TRANSPORTS, default="hivemind",
                    help="the swarm's transport: hivemind (the default) or tcp (what its peers pass to swarm.join)")
    ap.add_argument("--wait", type=float, default=1.0, help="seconds to let the DHT connect before reading (default 1)")
    ap.add_argument("--serve", action="store_true", help="serve a live dashboard in the browser until Ctrl-C")
    ap.add_argument("--listen", default="127.0.0.1", metavar="ADDR",
                    help="address the dashboard listens on (default 127.0.0.1; 0.0.0.0 shows it to the network)")
    ap.add_argument("--port", type=int, default=8000, help="dashboard port (default 8000; 0: any free port)")
    ap.add_argument("--refresh", type=float, default=2.0, metavar="S", help="dashboard: seconds between DHT reads (default 2)")
    args = ap.parse_args(argv)
    from swarm.join import check_multiaddr

    for addr in args.initial_peers:
        if check_multiaddr(addr):
            ap.error(f"--initial-peers {addr!r} is not a peer address ({check_multiaddr(addr)})")
        if address_mismatch(args.transport, addr):
            ap.error(address_mismatch(args.transport, addr))
    if args.serve and args.json:
        ap.error("--serve and --json do not go together (the dashboard serves the JSON at /api/swarm)")
    settings = None
    if args.serve:
        from swarm.dashboard import DashboardSettings

        try:
            settings = DashboardSettings(listen=args.listen, port=args.port, refresh=args.refresh)
        except SwarmError as e:
            ap.error(str(e))
    transport = None
    try:
        from swarm.key import load as load_swarm_key
        from swarm.membership import Membership

        key = load_swarm_key(args.swarm_key) if args.swarm_key else None
        transport = make_transport(args.transport, host="127.0.0.1", initial_peers=args.initial_peers, swarm_key=key,
                                   client=True)
        time.sleep(max(0.0, args.wait))
        members = Membership(transport)
        if settings is not None:
            from swarm.dashboard import serve

            serve(lambda: collect(members, transport.now()), settings, started=_say_serving)
            return 0
        snapshot = collect(members, transport.now())
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if transport is not None:
            transport.shutdown()
    if args.json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
    else:
        render(snapshot)
    return 0


def _say_serving(url: str, loop: str) -> None:
    print(f"dashboard: {url} ({loop} event loop; Ctrl-C stops)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
