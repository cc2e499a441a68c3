"""A peer's own settings: what `swarm.join`'s flags say, typed, checked once, and passed down instead of argparse's
namespace. Nothing here comes from the network."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PeerSettings:
    host: str = "0.0.0.0"                     # address to listen on
    port: int = 0                             # TCP port (0: any free one)
    initial_peers: tuple[str, ...] = ()       # multiaddrs of live peers; empty: start a new swarm
    announce: tuple[str, ...] = ()            # addresses other peers dial instead of the listening ones (a relay, a NAT)
    output: Path = Path("swarm-output")       # where this peer writes its adapter, metrics and logs
    config: Path | None = None                # this peer's own run config YAML
    data: Path | None = None                  # this peer's local copy of the run's dataset (the only data path it opens)
    run: str | None = None                    # the run to join by name
    max_rounds: int | None = None             # leave once the swarm's global round N is complete
    seed: int = 0                             # seed of the initial adapter and of data sampling
    backend: str = "auto"                     # auto | torch | mlx
    threads: int | None = None                # CPU threads for local compute
    memory_limit: float | None = None         # GB this peer may use
    max_utilization: float = 1.0              # fraction of the time this peer computes
    min_peers: int = 1                        # before round 1 of a new swarm, wait for this many peers
    background: bool = False                  # lowest priority; pause under other load or on battery
    swarm_key: Path | None = None             # private swarm key file
    uniform: bool = False                     # equal quotas instead of speed-negotiated ones (baseline)
    precision: str = "auto"                   # precision of the frozen base: auto | fp32 | bf16 | fp16 | nf4
    transport: str = "hivemind"               # hivemind | tcp (swarm.transport.factory); a swarm runs one

    @property
    def framework(self) -> str | None:
        """The training framework the flags force, or None (auto: the platform's)."""
        return None if self.backend == "auto" else self.backend

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PeerSettings":
        path = lambda v: Path(v).expanduser().resolve() if v else None  # noqa: E731
        return cls(host=args.host, port=args.port, initial_peers=tuple(args.initial_peers or ()),
                   announce=tuple(getattr(args, "announce", None) or ()),
                   output=Path(args.output or os.path.join(".", "swarm-output")).resolve(),
                   config=path(args.config), data=path(args.data), run=args.run, max_rounds=args.max_rounds,
                   seed=args.seed, backend=args.backend, threads=args.threads, memory_limit=args.memory_limit,
                   max_utilization=args.max_utilization, min_peers=args.min_peers, background=args.background,
                   swarm_key=path(args.swarm_key), uniform=args.uniform, precision=args.precision,
                   transport=getattr(args, "transport", "hivemind"))
