"""Peer addresses: the one module of the TCP transport that imports py-multiaddr.

A dialable address is `/ip4|ip6|dns4|dns6/HOST/tcp/PORT/p2p/PEER_ID`: the `/p2p/` part names the
peer that must answer there (the dialer checks it after the handshake). Anything else (UDP, QUIC,
relays, a missing port, an id that is not an Ed25519 peer id) is a ValueError with one line of text.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import multiaddr
from multiaddr.exceptions import Error as MultiaddrError

from swarm.transport.tcp.identity import public_key_of

__all__ = ["PeerAddress", "parse", "format_address"]

HOST_PROTOCOLS = ("ip4", "ip6", "dns4", "dns6")
MAX_ADDRESS_CHARS = 512


@dataclass(frozen=True)
class PeerAddress:
    host: str             # an IP address or a DNS name
    port: int
    peer_id: str | None   # None only where the caller allowed an address without /p2p/
    family: str = "ip4"   # ip4, ip6, dns4 or dns6

    def __str__(self) -> str:
        return format_address(self.host, self.port, self.peer_id, self.family)


def parse(text: object, require_peer_id: bool = True) -> PeerAddress:
    """A `PeerAddress` from a multiaddr string; ValueError with a one-line reason for a bad one."""
    if not isinstance(text, str):
        raise ValueError(f"a peer address is a string like /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..., not {type(text).__name__}")
    if not text or len(text) > MAX_ADDRESS_CHARS:
        raise ValueError(f"a peer address has 1 to {MAX_ADDRESS_CHARS} characters")
    try:
        items = [(proto.name, value) for proto, value in multiaddr.Multiaddr(text).items()]
    except (MultiaddrError, ValueError, TypeError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{text} is not a valid multiaddr: {reason}") from None
    names = [name for name, _ in items]
    expected = "/ip4|ip6|dns4|dns6/HOST/tcp/PORT" + ("/p2p/PEER_ID" if require_peer_id else "[/p2p/PEER_ID]")
    shape_ok = (len(names) in (2, 3) and names[0] in HOST_PROTOCOLS and names[1] == "tcp"
                and (len(names) == 2 or names[2] == "p2p"))
    if not shape_ok or (require_peer_id and len(names) != 3):
        raise ValueError(f"{text} is not a TCP peer address: expected {expected}")
    family, host = items[0]
    port = int(items[1][1])
    if not 0 < port < 65536:
        raise ValueError(f"{text}: port {port} is out of range 1-65535")
    peer_id = items[2][1] if len(items) == 3 else None
    if peer_id is not None:
        try:
            public_key_of(peer_id)
        except ValueError as e:
            raise ValueError(f"{text}: {e}") from None
    return PeerAddress(host=host, port=port, peer_id=peer_id, family=family)


def format_address(host: str, port: int, peer_id: str | None = None, family: str | None = None) -> str:
    """The multiaddr of `host:port` (IP addresses get ip4/ip6, names dns4 unless `family` says otherwise)."""
    if family is None:
        try:
            family = "ip6" if ipaddress.ip_address(host).version == 6 else "ip4"
        except ValueError:
            family = "dns4"
    text = f"/{family}/{host}/tcp/{int(port)}" + (f"/p2p/{peer_id}" if peer_id else "")
    parse(text, require_peer_id=peer_id is not None)  # what we print must parse back
    return text
