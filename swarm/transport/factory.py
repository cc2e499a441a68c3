"""Which transport a peer (or `swarm.status`) uses: built here, and only here, from `--transport`.

hivemind (the default): libp2p through hivemind; its key is `identity.key` in --output.
tcp: `swarm.transport.tcp` (TLS over TCP, no libp2p, no hivemind import); its key is `identity.ed25519`.

A swarm runs one of them, and the run record says which (`RunRecord.transport`). A peer of the other
kind cannot even reach it: the handshakes differ (TLS with peer-id pinning vs libp2p's multistream;
both fail within a second), and some addresses (relays, QUIC, RSA "Qm..." ids) are hivemind's only.
Both show up here as one line naming --transport, never a traceback or a hang.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swarm import SwarmError

if TYPE_CHECKING:
    from swarm.key import SwarmKey
    from swarm.transport.base import Transport

__all__ = ["TRANSPORTS", "IDENTITY_FILES", "make_transport", "address_mismatch"]

TRANSPORTS = ("hivemind", "tcp")
IDENTITY_FILES = {"hivemind": "identity.key", "tcp": "identity.ed25519"}  # in --output (two key types)
SAME = "every peer of a swarm uses the same --transport"


def address_mismatch(kind: str, addr: str) -> str | None:
    """Why `addr` cannot be a peer of a `kind` swarm (one line naming --transport), or None if it may be."""
    if kind != "tcp":
        return None  # hivemind's p2pd takes any libp2p address; a tcp peer's fails its handshake (`make_transport`)
    from swarm.transport.tcp.addresses import parse  # the tcp transport's own parser (no hivemind import)

    try:
        parse(addr)
    except ValueError as e:
        return f"--initial-peers {addr} is not a --transport tcp peer ({e}): a hivemind swarm needs --transport hivemind"
    return None


def make_transport(kind: str, *, host: str = "0.0.0.0", port: int = 0, initial_peers: list[str] | tuple = (),
                   announce: list[str] | tuple = (), output: Path | None = None, swarm_key: "SwarmKey | None" = None,
                   client: bool = False) -> "Transport":
    """A started transport of `kind`. `output`: where its identity key lives (None: a new id every run);
    `client`: only reads and writes records (swarm.status), never serves. SwarmError (one line) if it cannot start."""
    if kind not in TRANSPORTS:
        raise SwarmError(f"--transport {kind!r} is not one of {', '.join(TRANSPORTS)}")
    peers = list(initial_peers) or None
    for addr in peers or ():
        why = address_mismatch(kind, addr)
        if why:
            raise SwarmError(why)
    identity = output / IDENTITY_FILES[kind] if output is not None else None
    if kind == "tcp":
        from swarm.transport.tcp.transport import TcpTransport

        try:
            return TcpTransport(host=host, port=port, initial_peers=peers, announce=list(announce) or None,
                                identity=identity, swarm_key=swarm_key)
        except SwarmError as e:
            if peers and "could not reach any initial peer" in str(e):
                raise SwarmError(f"{e} (a hivemind swarm? {SAME})") from None
            raise
    from swarm.transport.hivemind_dht import HivemindTransport

    try:
        return HivemindTransport(host=host, port=port, initial_peers=peers, announce=list(announce) or None,
                                 identity=identity, log_file=output / "network.log" if output is not None else None,
                                 swarm_key=swarm_key, client_mode=client)
    except SwarmError as e:
        if peers and "could not reach any peer" in str(e):
            raise SwarmError(f"{e} (a --transport tcp swarm? {SAME})") from None
        raise
