"""How close does an all-reduce come to the ideal butterfly? The tcp transport beside hivemind's.

N peers, each its own process on 127.0.0.1, average a vector of S bytes (float64, encoded with check
lanes as the training loop does) in `--rounds` rounds; all start each round at the same instant, and
a round's time is the slowest member's (from that instant to its result). Printed per transport, N and
S: the median round time, the bus rate 2(N-1)/N x S / time, and with `--link` the ratio of the time
to the ideal 2(N-1)/N x S / B (B: the link's rate; 1.0 is the ideal, higher is slower).

`--link UP/DOWN/RTT` (e.g. 100mbit/100mbit/20ms) puts every peer behind swarm.links' emulated line
(the testbed's relays). Both transports dial from their listen port (hivemind's p2pd with reuseport;
tcp with SO_REUSEPORT when it announces an address, `TcpNode(dial_from_listen=True)`), so the relay
knows the dialer and a connection crosses both ends' lines, each way. The tcp transport opens one
connection per purpose (gossip, all-reduce), so each tcp peer gets several relay ports
(`LinkEmulator.add_peer(entries=...)`) and dials the next when a 4-tuple is taken; the notes column
counts connections the relay could not attribute (0 expected: each would cross the callee's line only).

    python scripts/bench_allreduce.py [--transports tcp,hivemind] [--npeers 2,4] [--mb 10,50]
                                      [--rounds 3] [--link 100mbit/100mbit/20ms]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One peer: prints its address, then for each "go TIME" line on stdin averages once and prints a JSON line."""
    import numpy as np

    from swarm.averaging import CHECK_EVERY, encode, new_salt, vector_size

    announce = None
    if args.transport == "tcp":
        from swarm.transport.tcp.identity import load_or_create
        from swarm.transport.tcp.transport import TcpTransport

        ident = Path(args.tmp) / f"id-{os.getpid()}.ed25519"
        pid = load_or_create(ident).peer_id
        if args.relay:
            announce = [f"/ip4/127.0.0.1/tcp/{r}/p2p/{pid}" for r in args.relay.split(",")]
        t = TcpTransport(host="127.0.0.1", port=args.port, initial_peers=args.peers or None, identity=ident,
                         announce=announce)
    else:
        from swarm.transport.hivemind_dht import HivemindTransport

        if args.relay:
            announce = [f"/ip4/127.0.0.1/tcp/{args.relay.split(',')[0]}"]
        t = HivemindTransport(host="127.0.0.1", port=args.port, initial_peers=args.peers or None, announce=announce)
    values = int(args.bytes / 8 * CHECK_EVERY / (CHECK_EVERY + 1))
    size = vector_size(values)
    t.open_averaging(run="bench", vector_size=size, matchmaking_time=5.0, allreduce_timeout=300.0, clip_norm=1.0,
                     chunk_timeout=30.0)
    rng = np.random.default_rng(os.getpid())
    salt = new_salt(rng)
    vec = encode(rng.normal(size=values) * 1e-4, 100, 1.0, salt)
    gather = {"tokens": 100, "salt": salt, "norm": 1.0, "plan": "p"}  # norm: the clip bound (what reducers check against)
    print(json.dumps({"addr": t.visible_maddrs()[0], "size": size}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] != "go":
            break
        at, key = float(cmd[1]), cmd[2]
        time.sleep(max(0.0, at - time.time()))
        try:
            r = t.all_reduce(vec, group_key=key, group_size=args.n, gather=gather, timeout=300.0, wait_until=at + 60)
            out = {"ok": True, "elapsed": time.time() - at, "seconds": r.seconds, "members": len(r.gathered),
                   "sent": r.bytes_sent, "rejections": len(r.rejections)}
        except Exception as e:  # noqa: BLE001 - reported
            out = {"ok": False, "elapsed": time.time() - at, "error": str(e)[:200]}
        print(json.dumps(out), flush=True)
    t.shutdown()


def run_case(transport: str, n: int, nbytes: int, rounds: int, link: str | None) -> dict:
    emulator, ports = None, []
    if link:
        from swarm.links import LinkEmulator, LinkSpec, free_port

        emulator = LinkEmulator("127.0.0.1")
        spec = LinkSpec.parse(link)
        for _ in range(n):
            port = free_port()
            emulator.add_peer(spec, port, entries=4 if transport == "tcp" else 1)
            ports.append((port, ",".join(map(str, emulator.peers[-1].relay_ports))))
        emulator.start()
    procs: list[subprocess.Popen] = []
    tmp = tempfile.mkdtemp(prefix="bench-allreduce-")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        first = None
        for i in range(n):
            cmd = [sys.executable, __file__, "--worker", "--transport", transport, "--n", str(n), "--bytes", str(nbytes),
                   "--tmp", tmp]
            if ports:
                cmd += ["--port", str(ports[i][0]), "--relay", str(ports[i][1])]
            if first:
                cmd += ["--peers", first]
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True, env=env, cwd=ROOT, start_new_session=True)
            procs.append(p)
            hello = json.loads(p.stdout.readline())
            if first is None:
                first = hello["addr"]
        time.sleep(3.0)  # addresses and DHT entries spread
        times, errors = [], []
        for r in range(rounds):
            at = time.time() + 1.0
            for p in procs:
                p.stdin.write(f"go {at} {transport}-{n}-{nbytes}-{r}\n")
                p.stdin.flush()
            outs = [json.loads(p.stdout.readline()) for p in procs]
            if all(o["ok"] and o["members"] == n for o in outs):
                times.append(max(o["elapsed"] for o in outs))
            else:
                errors.append(next((o.get("error") or f"{o.get('members')} members") for o in outs
                                   if not o["ok"] or o["members"] != n))
            time.sleep(0.5)
        return {"times": times, "errors": errors,
                "unattributed": emulator.unidentified if emulator is not None else None}
    finally:
        for p in procs:
            try:
                p.stdin.close()
            except Exception:
                pass
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is None:
                import signal

                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if emulator is not None:
            emulator.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--transport", default="tcp", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--relay", default="", help=argparse.SUPPRESS)
    ap.add_argument("--peers", action="append", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    ap.add_argument("--transports", default="tcp,hivemind")
    ap.add_argument("--npeers", default="2,4", help="group sizes, e.g. 2,4")
    ap.add_argument("--mb", default="10,50", help="vector sizes in MB (10^6 bytes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--link", default=None, help="UP/DOWN/RTT of every peer's emulated line (swarm.links)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rate = None
    if args.link:
        from swarm.links import LinkSpec

        spec = LinkSpec.parse(args.link)
        rate = min(spec.up_bps, spec.down_bps) / 8
    print(f"{'transport':<10}{'N':>3}{'MB':>6}{'median s':>10}{'bus MB/s':>10}" + (f"{'/ideal':>8}" if rate else "")
          + "  notes", flush=True)
    for transport in args.transports.split(","):
        for n in (int(x) for x in args.npeers.split(",")):
            for mb in (float(x) for x in args.mb.split(",")):
                nbytes = int(mb * 1e6)
                got = run_case(transport, n, nbytes, args.rounds, args.link)
                load = 2 * (n - 1) / n * nbytes
                if got["times"]:
                    med = statistics.median(got["times"])
                    line = f"{transport:<10}{n:>3}{mb:>6g}{med:>10.3f}{load / med / 1e6:>10.1f}"
                    if rate:
                        line += f"{med / (load / rate):>8.2f}"
                else:
                    line = f"{transport:<10}{n:>3}{mb:>6g}{'-':>10}{'-':>10}" + (f"{'-':>8}" if rate else "")
                notes = f"{len(got['times'])}/{args.rounds} ok"
                if got["unattributed"] is not None:
                    notes += f", {got['unattributed']} unattributed"
                notes += f"; {got['errors'][0]}" if got["errors"] else ""
                print(line + "  " + notes, flush=True)


if __name__ == "__main__":
    main()
