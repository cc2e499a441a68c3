"""The tcp transport behind swarm.links' relays: it dials from its listen port, so every connection is attributed."""

from __future__ import annotations

import time

import pytest

from swarm.links import LinkEmulator, LinkSpec, free_port
from swarm.transport.tcp.channel import REUSEPORT
from swarm.transport.tcp.identity import Identity
from swarm.transport.tcp.node import TcpNode

pytestmark = pytest.mark.skipif(not REUSEPORT, reason="no SO_REUSEPORT (Windows): tcp dials from ephemeral ports")


def test_gossip_and_service_connections_to_one_peer_are_all_attributed():
    emulator, spec = LinkEmulator(), LinkSpec.parse("100mbit/100mbit/2ms")
    ports = [free_port(), free_port()]
    for p in ports:
        emulator.add_peer(spec, p, entries=3)
    emulator.start()
    nodes: list[TcpNode] = []
    try:
        for k, p in enumerate(ports):
            announce = [f"/ip4/127.0.0.1/tcp/{r}" for r in emulator.peers[k].relay_ports]
            nodes.append(TcpNode(Identity.generate(), host="127.0.0.1", port=p, announce=announce, dial_from_listen=True,
                                 initial_peers=nodes[0].visible_maddrs() if nodes else None))
        a, b = nodes

        async def echo(ch):
            await ch.send(await ch.recv(5.0))

        a.register_service("echo", echo)
        end = time.monotonic() + 10
        while not (a.peers() and b.get("_swarm.tcp.addrs") and len(b.get("_swarm.tcp.addrs")) == 2):
            assert time.monotonic() < end, "no gossip connection"
            time.sleep(0.05)

        async def two_at_once():  # b -> a twice while the gossip connection b -> a is open: three 4-tuples
            chs = [await b.open_service(a.peer_id, "echo") for _ in range(2)]
            for ch in chs:
                await ch.send({"t": "x"})
                assert (await ch.recv(5.0))["t"] == "x"
            for ch in chs:
                ch.close()

        b.call(two_at_once())
        # (gossip may also dial a -> b, and keep one of the two)
        assert emulator.connections >= 3 and emulator.unidentified == 0, (emulator.connections, emulator.unidentified)
    finally:
        for n in nodes:
            n.shutdown()
        emulator.stop()
