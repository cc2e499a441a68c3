"""python -m swarm.testbed: a local swarm of N real peer processes on 127.0.0.1, with a live table.

The first peer starts the swarm; the others join it through the multiaddr it prints. Per-peer
`--memory-limit` and `--max-utilization` lists make a heterogeneous swarm on one machine.
`--link UP/DOWN/RTT` puts every peer behind an emulated home line (swarm.links: a userspace relay, no root).
Writes DIR/summary.json and the run's plots (DIR/plots/*.png, swarm.report); exits 0 only if every peer succeeded and all final adapters are identical.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from swarm.cli import Parser
from swarm import SwarmError
from swarm.links import LinkEmulator, parse_links
from swarm.metrics import read_metrics
from swarm.transport.factory import TRANSPORTS

START_TIMEOUT = 120.0
RELAY_ENTRIES = 4   # --link with --transport tcp: relay ports per peer (see start_links)


def _per_peer(text: str | None, n: int, what: str, cast=float) -> list:
    if text is None:
        return [None] * n
    try:
        values = [cast(v) for v in text.split(",")]
    except ValueError:
        raise SwarmError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if len(values) == 1:
        values *= n
    if len(values) != n:
        raise SwarmError(f"{what}: {len(values)} values for {n} peers")
    return values


def parse_args(argv):
    p = Parser(prog="python -m swarm.testbed", description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=3, help="number of peer processes (default 3)")
    p.add_argument("--max-rounds", type=int, default=20, help="rounds to train (default 20)")
    p.add_argument("--output", default=os.path.join("swarm-output", "testbed"), help="where peers write (DIR/peerK) and summary.json")
    p.add_argument("--config", default=None, help="run config YAML (default: the embedded default run)")
    p.add_argument("--memory-limit", default=None, metavar="GB[,GB...]", help="per-peer memory caps (one value, or one per peer)")
    p.add_argument("--max-utilization", default=None, metavar="F[,F...]", help="per-peer compute fractions (one value, or one per peer)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per peer (default: cores / peers, at least 1)")
    p.add_argument("--data", default=None, metavar="PATH[,PATH...]",
                   help="each peer's local copy of the run's dataset (one path, or one per peer): swarm.join --data")
    p.add_argument("--backend", default=None, metavar="B[,B...]", help="per-peer backend: torch or mlx (default: auto)")
    p.add_argument("--precision", default=None, metavar="P[,P...]",
                   help="per-peer base precision: auto, fp32, bf16, fp16 or nf4 (one value, or one per peer)")
    p.add_argument("--link", default=None, metavar="UP/DOWN/RTT[,...]",
                   help="emulated line per peer, e.g. 20mbit/100mbit/40ms (one for all peers, or a comma list, one per peer)")
    p.add_argument("--uniform", action="store_true", help="equal task sizes for every peer (baseline for benchmarks)")
    p.add_argument("--transport", choices=TRANSPORTS, default="hivemind",
                   help="every peer's network transport: hivemind (libp2p, the default) or tcp (swarm.join --transport)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds (default: generous)")
    args = p.parse_args(argv)
    if args.peers < 1:
        p.error("--peers must be at least 1")
    if args.max_rounds < 1:
        p.error("--max-rounds must be at least 1")
    return args


class Testbed:
    def __init__(self, args) -> None:
        self.args = args
        self.out = Path(args.output).resolve()
        self.limits = _per_peer(args.memory_limit, args.peers, "--memory-limit")
        self.utils = _per_peer(args.max_utilization, args.peers, "--max-utilization")
        self.backends = _per_peer(args.backend, args.peers, "--backend", cast=str)
        self.precisions = _per_peer(args.precision, args.peers, "--precision", cast=str)
        for prec in self.precisions:
            if prec is not None and prec not in ("auto", "fp32", "bf16", "fp16", "nf4"):
                raise SwarmError(f"--precision: {prec!r} is not one of auto, fp32, bf16, fp16, nf4")
        self.data = _per_peer(args.data, args.peers, "--data", cast=lambda v: str(Path(v).expanduser().resolve()))
        for d in self.data:
            if d is not None and not os.path.exists(d):
                raise SwarmError(f"--data: {d} does not exist: pass each peer's local copy of the run's dataset")
        for u in self.utils:
            if u is not None and not 0 < u <= 1:
                raise SwarmError(f"--max-utilization: {u} is not in (0, 1]")
        self.links = parse_links(args.link, args.peers) if args.link else None
        self.emulator: LinkEmulator | None = None
        self.ports: list[tuple[int, list[int]]] = []  # with --link: each peer's (private port, announced relay ports)
        self.threads = args.threads or max(1, (os.cpu_count() or 1) // args.peers)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.key_file = self.out / "swarm.key"  # a private swarm: its peers share this key (reused by a rerun)

    def ensure_key(self) -> None:
        from swarm import key

        if self.key_file.exists():
            key.load(self.key_file)
        else:
            key.create(self.key_file)

    def command(self, k: int, initial_peers: list[str] | None) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "swarm.join", "--host", "127.0.0.1", "--output", str(self.out / f"peer{k}"),
               "--max-rounds", str(a.max_rounds), "--min-peers", str(a.peers), "--threads", str(self.threads),
               "--seed", str(a.seed), "--swarm-key", str(self.key_file)]
        if getattr(a, "transport", "hivemind") != "hivemind":
            cmd += ["--transport", a.transport]
        if a.config:
            cmd += ["--config", a.config]
        if initial_peers:
            cmd += ["--initial-peers", *initial_peers]
        if self.limits[k] is not None:
            cmd += ["--memory-limit", str(self.limits[k])]
        if self.utils[k] is not None:
            cmd += ["--max-utilization", str(self.utils[k])]
        if self.backends[k] is not None:
            cmd += ["--backend", self.backends[k]]
        if self.precisions[k] is not None:
            cmd += ["--precision", self.precisions[k]]
        if self.data[k] is not None:
            cmd += ["--data", self.data[k]]
        if a.uniform:
            cmd += ["--uniform"]
        if self.ports:  # behind its emulated line: other peers dial the relay
            port, relays = self.ports[k]
            cmd += ["--port", str(port), "--announce", *(f"/ip4/127.0.0.1/tcp/{r}" for r in relays)]
        return cmd

    def start_links(self) -> None:
        """With --link: one relay per peer (swarm.links), started before any peer."""
        if not self.links:
            return
        self.emulator = LinkEmulator("127.0.0.1")
        held = [socket.socket() for _ in self.links]  # the peers' private ports, held until every relay has its own
        try:
            for sock, spec in zip(held, self.links):
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
                # tcp dials every connection from its listen port (libp2p multiplexes one): a relay port per
                # connection it may hold to one peer at once (gossip, all-reduce, state, one closing)
                self.emulator.add_peer(spec, port, entries=RELAY_ENTRIES if self.args.transport == "tcp" else 1)
                self.ports.append((port, self.emulator.peers[-1].relay_ports))
        finally:
            for sock in held:
                sock.close()
        self.emulator.start()

    def stop_links(self) -> None:
        if self.emulator is not None:
            self.emulator.stop()

    def spawn(self, k: int, initial_peers: list[str] | None) -> None:
        if k == 0:
            self.ensure_key()
        d = self.out / f"peer{k}"
        d.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl",):
            (d / stale).unlink(missing_ok=True)
        log = d / "log.txt"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen(self.command(k, initial_peers), stdout=f, stderr=subprocess.STDOUT,
                                               env=env, start_new_session=True))
        self.logs.append(log)

    def first_peer_addrs(self) -> list[str]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for line in self.logs[0].read_text(errors="replace").splitlines():
                if line.startswith("initial peers:"):
                    return line.split(":", 1)[1].split()
            if self.procs[0].poll() is not None:
                tail = self.logs[0].read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise SwarmError(f"the first peer exited with code {self.procs[0].returncode}: {tail[0]}")
            time.sleep(0.2)
        raise SwarmError(f"the first peer did not print its address within {START_TIMEOUT:.0f}s (see {self.logs[0]})")

    def stop_all(self, grace: float = 15.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # ----------------------------------------------------------------------------- display
    def rows(self) -> list[dict]:
        rows = []
        for k, p in enumerate(self.procs):
            m = read_metrics(self.out / f"peer{k}" / "metrics.jsonl")
            last = m[-1] if m else {}
            code = p.poll()
            rows.append({"peer": f"peer{k}", "id": last.get("peer", ""), "round": last.get("round", 0), "loss": last.get("loss"),
                         "tokens_per_s": last.get("tokens_per_s"), "tokens": last.get("tokens"),
                         "group": last.get("group_size"), "status": "running" if code is None else f"exit {code}",
                         "adapter": (last.get("adapter_sha256") or "")[:10]})
        return rows

    def table(self):
        from rich.table import Table

        t = Table(title=f"swarm testbed: {len(self.procs)} peers on 127.0.0.1 -> {self.out}")
        for col in ("peer", "round", "loss", "tokens/s", "tokens this round", "group", "adapter", "status"):
            t.add_column(col, justify="right" if col not in ("peer", "adapter", "status") else "left")
        for r in self.rows():
            t.add_row(r["peer"], str(r["round"]), f"{r['loss']:.4f}" if r["loss"] is not None else "-",
                      f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-", str(r["tokens"] or "-"),
                      str(r["group"] or "-"), r["adapter"] or "-", r["status"])
        return t

    def watch(self, deadline: float) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console()
        if console.is_terminal:
            with Live(self.table(), console=console, refresh_per_second=2) as live:
                while self._running(deadline):
                    time.sleep(0.5)
                    live.update(self.table())
                live.update(self.table())
            return
        seen = [0] * len(self.procs)  # not a terminal: one plain line per completed round
        while True:
            running = self._running(deadline)
            for k in range(len(self.procs)):
                for m in read_metrics(self.out / f"peer{k}" / "metrics.jsonl")[seen[k]:]:
                    print(f"peer{k} round {m['round']}: loss {m['loss']:.4f}, {m['tokens']} tokens, "
                          f"{m['tokens_per_s']:.0f} tok/s, group {m['group_size']}, adapter {m['adapter_sha256'][:10]}", flush=True)
                    seen[k] += 1
            if not running:
                break
            time.sleep(0.5)
        console.print(self.table())

    def _running(self, deadline: float) -> bool:
        if time.monotonic() > deadline:
            print(f"testbed: timeout after {self.args.timeout or self.default_timeout():.0f}s, stopping peers", flush=True)
            self.stop_all()
            return False
        return any(p.poll() is None for p in self.procs)

    def default_timeout(self) -> float:
        return 180.0 + 60.0 * self.args.max_rounds

    # ----------------------------------------------------------------------------- summary
    def summary(self) -> dict:
        from swarm.adapters import adapter_sha256, load_peft_adapter

        peers = []
        for k, p in enumerate(self.procs):
            d = self.out / f"peer{k}"
            m = read_metrics(d / "metrics.jsonl")
            try:
                digest = adapter_sha256(load_peft_adapter(d / "adapter"))
            except Exception:
                digest = None
            peers.append({"peer": f"peer{k}", "peer_id": m[-1]["peer"] if m else None, "exit_code": p.returncode,
                          "rounds_completed": len(m), "last_round": m[-1]["round"] if m else 0,
                          "first_loss": m[0]["loss"] if m else None, "last_loss": m[-1]["loss"] if m else None,
                          "adapter_sha256": digest, "output": str(d)})
        hashes = {p["adapter_sha256"] for p in peers}
        ok = all(p["exit_code"] == 0 for p in peers) and len(hashes) == 1 and None not in hashes
        out = {"ok": ok, "all_adapters_identical": len(hashes) == 1 and None not in hashes, "peers": peers,
               "max_rounds": self.args.max_rounds}
        if self.emulator is not None:  # what crossed each peer's emulated line
            out["links"] = self.emulator.stats()
            out["link_connections"], out["link_unidentified"] = self.emulator.connections, self.emulator.unidentified
        return out


def draw_plots(out: Path) -> None:
    """The run's plots (swarm.report) into DIR/plots, their paths printed; a run with no round draws none."""
    from swarm.report import report

    began = time.monotonic()
    try:
        paths = report([out], out / "plots")
    except SwarmError as e:
        print(f"testbed: no plots: {e}", flush=True)
        return
    print(f"testbed: {len(paths)} plots in {time.monotonic() - began:.1f}s: " + " ".join(map(str, paths)), flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (e.g. from `timeout`) stops the peers like Ctrl-C does, never orphans them


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    from swarm.lifecycle import guard

    guard()  # a killed testbed leaves no peer behind
    try:
        bed = Testbed(args)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bed.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (args.timeout or bed.default_timeout())
    lines = f", links {','.join(map(str, bed.links))}" if bed.links else ""
    print(f"testbed: starting {args.peers} peers on 127.0.0.1 ({bed.threads} thread(s) each{lines}), logs in {bed.out}/peer*/log.txt",
          flush=True)
    try:
        bed.start_links()
        bed.spawn(0, None)
        addrs = bed.first_peer_addrs()
        print(f"testbed: first peer is up at {addrs[0]}", flush=True)
        for k in range(1, args.peers):
            bed.spawn(k, addrs)
        bed.watch(deadline)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        bed.stop_all()
        return 2
    except KeyboardInterrupt:
        print("testbed: interrupted, stopping peers", flush=True)
        bed.stop_all()
    finally:
        bed.stop_all()
        bed.stop_links()
    summary = bed.summary()
    (bed.out / "summary.json").write_text(json.dumps(summary, indent=2))
    failed = []
    for p in summary["peers"]:
        if p["exit_code"] != 0:
            tail = (bed.out / p["peer"] / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
            print(f"{p['peer']} exited with {p['exit_code']}: " + " | ".join(tail), file=sys.stderr)
            failed.append(f"{p['peer']} exited with {p['exit_code']} ({tail[-1] if tail else 'no output'})")
    draw_plots(bed.out)
    if failed:  # the real failure, not a consequence of it
        verdict = "; ".join(failed)
    else:
        verdict = "all adapters identical" if summary["all_adapters_identical"] else "ADAPTERS DIFFER"
    print(f"testbed: {'OK' if summary['ok'] else 'FAILED'}: {verdict}; summary in {bed.out / 'summary.json'}", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
