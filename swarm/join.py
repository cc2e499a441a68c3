"""python -m swarm.join: one peer of a swarm.

`run_peer` reads top to bottom as the data flow:
    detect -> advertise -> plan -> train -> average -> commit -> checkpoint
Everything it calls is a module of its own: hardware, transport, membership, planner, round,
averaging, checkpoint. Errors the user can act on are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading

from swarm import SwarmError
from swarm.cli import Parser
from swarm.settings import PeerSettings
from swarm.transport.factory import TRANSPORTS, address_mismatch

DEFAULT_OUTPUT = "swarm-output"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m swarm.join", description="Join (or start) a swarm and train its LoRA adapter.")
    p.add_argument("--initial-peers", nargs="+", metavar="MULTIADDR", default=None,
                   help="multiaddrs of any live peer (what the first peer prints); none = start a new swarm")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1 keeps everything on loopback)")
    p.add_argument("--port", type=int, default=0, help="TCP port to listen on (default: any free port)")
    p.add_argument("--announce", nargs="+", metavar="MULTIADDR", default=None,
                   help="the addresses other peers dial to reach this one, like /ip4/203.0.113.7/tcp/31337 (a forwarded "
                        "port, or the testbed's link relay); default: the listen address")
    p.add_argument("--config", default=None, help="run config YAML (default: the embedded default run)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="this peer's local copy of the run's dataset (checked against the run's data.sha256); "
                        "the only data path a peer ever opens besides its own --config")
    p.add_argument("--run", default=None, help="name of the run to join (default: the config's run, or the best fit when joining)")
    p.add_argument("--max-rounds", type=int, default=None, help="leave cleanly once the swarm's global round N is complete")
    p.add_argument("--output", default=None, help=f"where this peer writes its adapter and metrics (default: ./{DEFAULT_OUTPUT}/<run>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial adapter and of data sampling")
    p.add_argument("--backend", choices=["auto", "torch", "mlx"], default="auto", help="training framework (auto: mlx on Apple Silicon, else torch)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for local compute (default: the framework's choice)")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GB", help="cap the memory this peer may use")
    p.add_argument("--max-utilization", type=float, default=1.0, metavar="F",
                   help="compute only this fraction of the time (0 < F <= 1), leaving the rest to the machine's owner")
    p.add_argument("--min-peers", type=int, default=1, help="before round 1 of a new swarm, wait until this many peers are advertised")
    p.add_argument("--background", action="store_true",
                   help="lowest CPU/IO priority; pause while other processes keep the CPU busy or on battery")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "nf4"], default="auto",
                   help="precision of the frozen base model (the LoRA adapter is fp32 everywhere); auto: the most precise "
                        "one this peer can run")
    p.add_argument("--swarm-key", default=None, metavar="FILE",
                   help="private swarm: only peers with this key (python -m swarm.key FILE makes one) are members")
    p.add_argument("--transport", choices=TRANSPORTS, default="hivemind",
                   help="network transport, the same on every peer of a swarm: hivemind (libp2p: relays, NAT traversal; "
                        "the default) or tcp (direct TLS over TCP, no libp2p daemon; peers must be reachable)")
    p.add_argument("--uniform", action="store_true", help="equal token quotas for all peers instead of speed-negotiated ones (baseline)")
    args = p.parse_args(argv)
    if not 0 < args.max_utilization <= 1:
        p.error("--max-utilization must be in (0, 1]")
    if args.max_rounds is not None and args.max_rounds < 0:
        p.error("--max-rounds must be >= 0")
    if args.memory_limit is not None and args.memory_limit <= 0:
        p.error("--memory-limit must be a positive number of GB")
    if not 0 <= args.port <= 65535:
        p.error("--port must be in 0..65535")
    if args.data is not None and not os.path.exists(args.data):
        p.error(f"--data {args.data!r} does not exist: pass your local copy of the run's dataset")
    for addr in args.initial_peers or ():
        why = check_multiaddr(addr)
        if why:
            p.error(f"--initial-peers {addr!r} is not a peer address ({why}): pass what the first peer printed, "
                    "like /ip4/192.168.1.5/tcp/31337/p2p/12D3KooW...")
        why = address_mismatch(args.transport, addr)
        if why:
            p.error(why)
    for addr in args.announce or ():
        why = check_multiaddr(addr, peer=False)
        if why:
            p.error(f"--announce {addr!r} is not an address to announce ({why}): like /ip4/203.0.113.7/tcp/31337")
    return args


def check_multiaddr(addr: str, peer: bool = True) -> str | None:
    """Why `addr` is not a dialable peer multiaddr (`peer=False`: a dialable address of this peer), or None if it is."""
    from multiaddr import Multiaddr

    try:
        protos = [p.name for p in Multiaddr(addr).protocols()]
    except Exception as e:
        return str(e).splitlines()[0] if str(e) else "unparsable"
    if peer and "p2p" not in protos:
        return "no /p2p/<peer id> part"
    if not {"tcp", "udp"} & set(protos):
        return "no /tcp/<port> part"
    if not peer and re.search(r"/(tcp|udp)/0(/|$)", addr):
        return "port 0: announce an explicit port"
    return None


class StopFlag:
    """SIGINT/SIGTERM: finish (or abandon) the current round, save, leave, exit 0. A second signal exits at once."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.event.is_set():
            os._exit(130)
        self.event.set()

    def __call__(self) -> bool:
        return self.event.is_set()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopFlag()
    stop.install()
    try:
        return run_peer(args, stop)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def precision_settings(settings: PeerSettings, platform: str):
    """This peer's base precision from --precision (SwarmError naming the fix if it cannot run here)."""
    from swarm.precision import settings as precision

    framework = settings.framework or ("mlx" if platform == "mlx" else "torch")
    return precision(settings.precision, platform, framework)


def run_peer(args: argparse.Namespace, stop: StopFlag) -> int:
    from swarm import checkpoint
    from swarm.peer import Peer

    # detect: this machine, the run, the base model, the backend
    settings = PeerSettings.from_args(args)          # typed; --data is the only data path this peer opens
    peer = Peer.create(settings)
    try:
        peer.precision = precision_settings(settings, peer.hw.backend)   # the base's precision, checked before joining
        # advertise: join the DHT, agree on the run, get the current state, announce capability
        peer.connect()
        state = peer.initial_state(stop)
        peer.start_advertising()
        peer.start_background_mode()
        while not stop() and (settings.max_rounds is None or state.round < settings.max_rounds):
            rnd = state.round + 1
            plan = peer.plan(rnd, stop)                                  # plan
            if plan is None:                     # waiting (peers, pause) or caught up with the swarm meanwhile
                state = peer.state
                continue
            train = peer.train(plan, rnd, stop)                          # train
            outcome = peer.average(plan, train, rnd)                     # average
            if outcome.ok:
                state = peer.commit(outcome, rnd)                        # commit
                checkpoint.save(peer.out / "checkpoint", state)          # checkpoint
                peer.publish(state, plan, train, outcome)
            else:
                state = peer.roll_back(outcome, rnd, stop)               # roll back: nothing applied
        peer.leave(state, finished=not stop())
        return 0
    finally:
        peer.close()


if __name__ == "__main__":
    sys.exit(main())
