"""python -m swarm.status: the swarm as a table, without joining training.

Reads the runs, capability adverts and progress records from the DHT (all validated), and shows
per run the plan every peer derives for its next round. `--json` prints the same, stable for scripts:
  {"time": float, "runs": [{"name", "model", "params", "base_sha256", "fingerprint", "round",
    "plan": RoundPlan.to_dict(), "peers": [{"peer_id", "tier", "backend", "device", "memory_usable_bytes",
    "memory_total_bytes", "tokens_per_s", "max_utilization", "max_micro_batch", "micro_batch", "quota_tokens",
    "round", "last_seen_s", "state", "loss"}]}]}
"""

from __future__ import annotations

import json
import sys
import time

from swarm.cli import Parser
from swarm import SwarmError


def collect(members, now: float) -> dict:
    from swarm.config import RunConfig
    from swarm.planner import plan_round

    runs = []
    for name, rec in sorted(members.runs().items()):
        adverts = members.adverts(name)
        progress = {p.peer_id: p for p in members.progress(name)}
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
            peers.append({
                "peer_id": a.peer_id, "tier": a.tier, "backend": a.backend, "device": a.device,
                "memory_usable_bytes": a.memory_usable_bytes, "memory_total_bytes": a.memory_total_bytes,
                "tokens_per_s": a.throughput_tokens_per_s, "max_utilization": a.max_utilization,
                "max_micro_batch": a.max_micro_batch, "micro_batch": task.micro_batch if task else 0,
                "quota_tokens": task.quota_tokens if task else 0, "round": p.round if p else 0,
                "last_seen_s": round(max(0.0, now - max(a.timestamp, p.timestamp if p else 0.0)), 1),
                "state": state, "loss": p.loss if p else None,
            })
        runs.append({"name": name, "model": rec.model, "params": rec.params, "base_sha256": rec.base_sha256,
                     "fingerprint": rec.fingerprint, "round": current, "plan": plan_dict, "peers": peers})
    return {"time": now, "runs": runs}


def render(snapshot: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not snapshot["runs"]:
        console.print("no runs in this swarm yet")
    for run in snapshot["runs"]:
        t = Table(title=f"run {run['name']}: {run['model']} ({run['params'] / 1e6:.1f}M params), round {run['round']}, "
                        f"{len(run['peers'])} peers, next plan {run['plan'].get('plan_id', '-')}")
        for col in ("peer", "tier", "backend", "memory", "tokens/s", "util", "micro-batch", "quota", "round", "loss",
                    "last seen", "state"):
            t.add_column(col, justify="left" if col in ("peer", "tier", "backend", "state") else "right")
        for p in run["peers"]:
            t.add_row(p["peer_id"][:12], p["tier"], p["backend"], f"{p['memory_usable_bytes'] / 1e9:.1f} GB",
                      f"{p['tokens_per_s']:.0f}", f"{p['max_utilization']:.2f}", str(p["micro_batch"]),
                      str(p["quota_tokens"]), str(p["round"]), f"{p['loss']:.4f}" if p["loss"] is not None else "-",
                      f"{p['last_seen_s']:.0f}s", p["state"])
        console.print(t)


def main(argv=None) -> int:
    ap = Parser(prog="python -m swarm.status", description="Show a swarm's runs and peers without joining training.")
    ap.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR", help="any live peer's multiaddr")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--swarm-key", default=None, metavar="FILE", help="the key of a private swarm (to read its records)")
    ap.add_argument("--wait", type=float, default=1.0, help="seconds to let the DHT connect before reading (default 1)")
    args = ap.parse_args(argv)
    from swarm.join import check_multiaddr

    for addr in args.initial_peers:
        if check_multiaddr(addr):
            ap.error(f"--initial-peers {addr!r} is not a peer address ({check_multiaddr(addr)})")
    transport = None
    try:
        from swarm.membership import Membership
        from swarm.transport.hivemind_dht import HivemindTransport

        from swarm.key import load as load_swarm_key

        key = load_swarm_key(args.swarm_key) if args.swarm_key else None
        transport = HivemindTransport(host="127.0.0.1", initial_peers=args.initial_peers, client_mode=True, swarm_key=key)
        time.sleep(max(0.0, args.wait))
        snapshot = collect(Membership(transport), transport.now())
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


if __name__ == "__main__":
    sys.exit(main())
