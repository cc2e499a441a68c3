"""Garbage at a live TCP-transport node: does it survive, and how much does its memory grow?

Starts one node (`TcpTransport` on 127.0.0.1) in a child process, then sends it, from this process:
- raw garbage connections (random bytes where a TLS handshake should be);
- authenticated connections carrying frames the node ignores (unknown types, stale and refused
  records: most of the frames, many per connection);
- authenticated connections ending in a frame the node must drop them for (a 4 GiB length header,
  a frame over the cap, truncated frames, random bodies, non-map msgpack, deep nesting, malformed
  and forged records, oversized batches).
It then checks the node still serves (a fresh connection receives the node's record in its sync)
and prints the node's RSS before and after.

    python scripts/bench_tcp_garbage.py [--frames 100000] [--seed 0]

Target (issue 14): 10^5 frames and a 4 GiB header: no crash, RSS growth < 50 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarm.transport.tcp import addresses  # noqa: E402
from swarm.transport.tcp.channel import TlsContexts, dial, encode  # noqa: E402
from swarm.transport.tcp.identity import Identity  # noqa: E402
from swarm.transport.tcp.records import SignedRecord, sign  # noqa: E402

NODE = """
import sys, time
from swarm.transport.tcp.transport import TcpTransport
t = TcpTransport(host="127.0.0.1")
t.put("bench", {"alive": True}, ttl=3600)
print(t.visible_maddrs()[0], flush=True)
sys.stdin.read()  # until the bench closes our stdin
t.shutdown()
"""


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def fatal_frames(rng: random.Random) -> list:
    stranger = Identity.generate()

    def forged() -> list:  # fresh each time: an expired one would be refused without a signature check
        return SignedRecord("bench", stranger.peer_id, msgpack.packb(1), time.time() + 30, b"\1" * 64).to_wire()

    return [
        lambda: (2 ** 32 - 1).to_bytes(4, "big"),
        lambda: (5 << 20).to_bytes(4, "big") + rng.randbytes(1000),
        lambda: frame(rng.randbytes(rng.randrange(1, 4000))),
        lambda: frame(msgpack.packb([1, 2, 3])),
        lambda: frame(b"\x91" * 100000 + b"\x90"),
        lambda: encode({"t": 7}),
        lambda: encode({"t": "rec", "r": {"a": 1}}),
        lambda: encode({"t": "rec", "r": [[1, 2, 3, 4, 5]]}),
        lambda: encode({"t": "rec", "r": [forged()]}),
        lambda: encode({"t": "rec", "r": [[None] * 5] * 5000}),
    ]


def noise_frames(rng: random.Random, me: Identity) -> list:
    old = sign(me, "noise", msgpack.packb(rng.randbytes(1000)), time.time() + 600)
    return [
        lambda: encode({"t": "x-" + str(rng.randrange(100)), "pad": rng.randbytes(rng.randrange(0, 60000))}),
        lambda: encode({"t": "rec", "r": [old.to_wire()]}),  # stale after the first
        lambda: encode({"t": "rec", "r": [sign(me, "big", msgpack.packb(b"x" * 200000), time.time() + 60).to_wire()]}),
        lambda: encode({"t": "rec", "r": [sign(me, "late", msgpack.packb(1), time.time() - 1).to_wire()]}),
    ]


async def attack(port: int, peer_id: str, frames: int, seed: int) -> dict:
    rng = random.Random(seed)
    me = Identity.generate()
    tls = TlsContexts(me)
    fatal, noise = fatal_frames(rng), noise_frames(rng, me)
    counts = {"frames": 0, "raw connections": 0, "authenticated connections": 0}
    # the 4 GiB header first, alone
    ch = await dial("127.0.0.1", port, peer_id, me, tls)
    ch.writer.write((2 ** 32 - 1).to_bytes(4, "big"))
    await ch.writer.drain()
    await asyncio.wait_for(ch.reader.read(), 10)
    ch.close()
    counts["frames"] += 1
    i = 0
    while counts["frames"] < frames:
        i += 1
        if i % 10 == 0:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(rng.randbytes(rng.randrange(1, 5000)))
            await w.drain()
            w.close()
            counts["raw connections"] += 1
            counts["frames"] += 1
            continue
        ch = await dial("127.0.0.1", port, peer_id, me, tls)
        counts["authenticated connections"] += 1
        for _ in range(min(200, frames - counts["frames"])):
            ch.writer.write(rng.choice(noise)())
            counts["frames"] += 1
            if ch.writer.transport.get_write_buffer_size() > 1 << 20:
                await ch.writer.drain()
        kind = rng.randrange(len(fatal))
        ch.writer.write(fatal[kind]())
        counts["frames"] += 1
        try:
            await ch.writer.drain()
            if kind != 2:  # a random body may be a (truncated) frame the node still waits on
                await asyncio.wait_for(ch.reader.read(), 10)
        except asyncio.TimeoutError:
            counts["not dropped"] = counts.get("not dropped", 0) + 1  # the node kept a connection it should drop
        except (ConnectionError, OSError):
            pass
        ch.close()
    # still serving: a fresh connection gets the node's record in its sync
    ch = await dial("127.0.0.1", port, peer_id, me, tls)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = await asyncio.wait_for(ch.recv(), 10)
        if msg.get("t") == "rec" and any(r[0] == "bench" and r[1] == peer_id for r in msg["r"]):
            counts["served after"] = True
            break
    ch.close()
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    node = subprocess.Popen([sys.executable, "-c", NODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        maddr = node.stdout.readline().strip()
        addr = addresses.parse(maddr)
        proc = psutil.Process(node.pid)
        time.sleep(0.5)
        before = proc.memory_info().rss
        start = time.monotonic()
        counts = asyncio.run(attack(addr.port, addr.peer_id, args.frames, args.seed))
        seconds = time.monotonic() - start
        time.sleep(1.0)
        after = proc.memory_info().rss
        alive = node.poll() is None
    finally:
        try:
            node.stdin.close()
            node.wait(timeout=15)
        except Exception:
            node.kill()
            node.wait()
    growth = (after - before) / 2 ** 20
    print(f"{counts['frames']} garbage frames in {seconds:.1f}s ({counts['authenticated connections']} authenticated and "
          f"{counts['raw connections']} raw connections); node alive: {alive}; served after: "
          f"{counts.get('served after', False)}")
    print(f"node RSS {before / 2 ** 20:.1f} MiB -> {after / 2 ** 20:.1f} MiB (growth {growth:+.1f} MiB; target < 50 MB)")
    if counts.get("not dropped"):
        print(f"{counts['not dropped']} connections were not dropped after a fatal frame")
    ok = alive and counts.get("served after", False) and growth * 2 ** 20 < 50e6 and not counts.get("not dropped")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
