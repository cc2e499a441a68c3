"""Do the testbed's emulated lines (swarm.links, `swarm.testbed --link`) give the rate and RTT they are set to?

Real TCP transfers through the same relays and links the testbed uses, side by side with the setting:
  - peer <-> internet: a client outside the swarm (it crosses only the peer's line): RTT, uplink, downlink;
  - peer <-> peer: peer B dials peer A from its listen port, as libp2p does: B->A runs at min(B up, A down)
    and the RTT is A's plus B's.
Rates are measured at the receiver between the first and the last byte of a transfer of about
`--seconds` at the set rate; RTT is the median of 20 one-byte round trips. Prints setting, measured
and measured/setting; exits 1 when a ratio is outside 0.9..1.1.

    python scripts/bench_links.py [--link 20mbit/100mbit/40ms,10mbit/50mbit/80ms] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm import SwarmError  # noqa: E402
from swarm.links import LinkEmulator, LinkSpec, free_port  # noqa: E402

PINGS = 20


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A peer's service: P = echo one byte (20 times), U<n> = send n bytes, D<n> = receive n bytes, report the rate."""
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        cmd = (await reader.readline()).decode().strip()
        if cmd == "P":
            for _ in range(PINGS):
                writer.write(await reader.readexactly(1))
                await writer.drain()
        elif cmd.startswith("U"):
            writer.write(b"\0" * int(cmd[1:]))
            await writer.drain()
        elif cmd.startswith("D"):
            bps = await receive_rate(reader, int(cmd[1:]))
            writer.write(f"{bps}\n".encode())
            await writer.drain()
    finally:
        writer.close()


async def receive_rate(reader: asyncio.StreamReader, n: int) -> float:
    """Bits per second between the first and the last byte of `n` bytes (the first chunk not counted)."""
    first = await reader.read(1 << 16)
    t0, got, t1 = time.monotonic(), len(first), time.monotonic()
    while got < n:
        data = await reader.read(1 << 16)
        if not data:
            raise ConnectionError("transfer cut short")
        got += len(data)
        t1 = time.monotonic()
    return (got - len(first)) * 8 / max(t1 - t0, 1e-9)


def listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    s.setblocking(False)
    return s


async def dial(relay_port: int, from_port: int | None):
    """Connect to a relay, from `from_port` (a peer's listen port, like libp2p's reuseport dial) or from anywhere."""
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if from_port is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # no TIME_WAIT: the next dial reuses the port
        s.bind(("127.0.0.1", from_port))
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", relay_port))
    return await asyncio.open_connection(sock=s)


async def rtt(relay: int, from_port: int | None) -> float:
    reader, writer = await dial(relay, from_port)
    writer.write(b"P\n")
    times = []
    for _ in range(PINGS):
        t = time.monotonic()
        writer.write(b"x")
        await writer.drain()
        await reader.readexactly(1)
        times.append(time.monotonic() - t)
    writer.close()
    await writer.wait_closed()
    return statistics.median(times)


async def upload(relay: int, from_port: int | None, n: int) -> float:
    """The far peer sends n bytes to the dialer: the far peer's uplink (and the dialer's downlink)."""
    reader, writer = await dial(relay, from_port)
    writer.write(f"U{n}\n".encode())
    bps = await receive_rate(reader, n)
    writer.close()
    await writer.wait_closed()
    return bps


async def download(relay: int, from_port: int | None, n: int) -> float:
    """The dialer sends n bytes to the far peer: the far peer's downlink (and the dialer's uplink)."""
    reader, writer = await dial(relay, from_port)
    writer.write(f"D{n}\n".encode())
    writer.write(b"\0" * n)
    await writer.drain()
    bps = float((await reader.readline()).decode())
    writer.close()
    await writer.wait_closed()
    return bps


def show(what: str, setting: float, measured: float, unit: str, scale: float) -> bool:
    ratio = measured / setting
    ok = 0.9 <= ratio <= 1.1
    print(f"  {what:<34} {setting / scale:>10.2f} {measured / scale:>10.2f} {unit:<6} {ratio:>6.3f} {'ok' if ok else 'OFF'}")
    return ok


async def bench(specs: list[LinkSpec], seconds: float) -> bool:
    emulator = LinkEmulator()
    ports, relays, servers = [], [], []
    for spec in specs:
        port = free_port()
        ports.append(port)
        relays.append(emulator.add_peer(spec, port))
        servers.append(await asyncio.start_server(handle, sock=listener(port)))
    emulator.start()
    ok = True
    try:
        print(f"{'':36} {'setting':>10} {'measured':>10} {'':6} {'ratio':>6}")
        for k, spec in enumerate(specs):
            print(f"peer {k} ({spec}) <-> a client outside the swarm")
            ok &= show("RTT", spec.rtt, await rtt(relays[k], None), "ms", 1e-3)
            ok &= show("uplink", spec.up_bps, await upload(relays[k], None, int(spec.up_bps / 8 * seconds)), "Mbit/s", 1e6)
            ok &= show("downlink", spec.down_bps, await download(relays[k], None, int(spec.down_bps / 8 * seconds)),
                       "Mbit/s", 1e6)
        if len(specs) >= 2:
            a, b = specs[0], specs[1]
            print(f"peer 1 ({b}) dials peer 0 ({a})")
            ok &= show("RTT (sum of both lines)", a.rtt + b.rtt, await rtt(relays[0], ports[1]), "ms", 1e-3)
            rate = min(b.up_bps, a.down_bps)
            ok &= show("1 -> 0 (min of 1 up, 0 down)", rate, await download(relays[0], ports[1], int(rate / 8 * seconds)),
                       "Mbit/s", 1e6)
            rate = min(a.up_bps, b.down_bps)
            ok &= show("0 -> 1 (min of 0 up, 1 down)", rate, await upload(relays[0], ports[1], int(rate / 8 * seconds)),
                       "Mbit/s", 1e6)
        print(f"connections {emulator.connections}, from outside the swarm {emulator.unidentified}")
    finally:
        emulator.stop()
        for s in servers:
            s.close()
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--link", default="20mbit/100mbit/40ms,10mbit/50mbit/80ms", help="comma list of UP/DOWN/RTT lines")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each transfer at the set rate")
    args = p.parse_args(argv)
    try:
        specs = [LinkSpec.parse(t) for t in args.link.split(",")]
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = asyncio.run(bench(specs, args.seconds))
    print("all within 10% of the setting" if ok else "SOME MEASUREMENTS ARE OFF BY MORE THAN 10%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
