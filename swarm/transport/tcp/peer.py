"""One connected peer of the gossip node: what goes out to it, and what its messages may hold.

Outgoing: first the sync snapshot (every live record the node held when the connection opened, in
frames of at most `MAX_BATCH` records or about `SYNC_BATCH_BYTES` of values), then the records
queued since, in order, and a ping after `PING_INTERVAL` seconds with nothing to send (a peer
silent for `IDLE_TIMEOUT` is dropped: half-open connections do not linger). The queue is bounded in bytes (`SEND_QUEUE_BYTES`): a peer that does not
read is dropped rather than buffered for without end; the sync on reconnection repairs what it missed.

Incoming: `parse_records` turns a "rec" message into records, or a reason to drop the sender.
"""

from __future__ import annotations

import asyncio

from swarm.transport.tcp.channel import Channel
from swarm.transport.tcp.records import SignedRecord

__all__ = ["Peer", "parse_records", "MAX_BATCH", "IDLE_TIMEOUT"]

MAX_BATCH = 1024                # records per "rec" frame, at most
SYNC_BATCH_BYTES = 1 << 20      # a sync frame's values, about
SEND_QUEUE_BYTES = 32 << 20     # queued for one peer before it counts as too slow and is dropped
PING_INTERVAL = 15.0            # seconds of nothing to send before a ping
IDLE_TIMEOUT = 3 * PING_INTERVAL  # a peer silent this long (no records, no pings) is gone: drop it
RECORD_OVERHEAD = 256           # a record's bytes besides its value, about (key, owner, signature, framing)


class Peer:
    """A connected peer: its channel, the sync snapshot still to send, and a bounded queue after it."""

    def __init__(self, ch: Channel, backlog: list[SignedRecord]) -> None:
        self.ch = ch
        self.backlog = backlog
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queued_bytes = 0

    def offer(self, rec: SignedRecord) -> bool:
        """Queue `rec` for this peer; False when its queue is full (the peer is too slow: drop it)."""
        size = len(rec.value) + RECORD_OVERHEAD
        if self.queued_bytes + size > SEND_QUEUE_BYTES:
            return False
        self.queued_bytes += size
        self.queue.put_nowait((rec, size))
        return True

    async def pump(self) -> None:
        """Send the sync snapshot, then whatever gets queued, until cancelled (ChannelError if sending fails)."""
        batch, size = [], 0
        for rec in self.backlog:
            batch.append(rec.to_wire())
            size += len(rec.value)
            if len(batch) >= MAX_BATCH or size >= SYNC_BATCH_BYTES:
                await self.ch.send({"t": "rec", "r": batch})
                batch, size = [], 0
        if batch:
            await self.ch.send({"t": "rec", "r": batch})
        self.backlog = []
        while True:
            try:
                rec, size = await asyncio.wait_for(self.queue.get(), PING_INTERVAL)
            except asyncio.TimeoutError:
                await self.ch.send({"t": "ping"})  # keeps the connection alive, and shows it is
                continue
            self.queued_bytes -= size
            await self.ch.send({"t": "rec", "r": [rec.to_wire()]})


def parse_records(msg: dict) -> list[SignedRecord] | str:
    """The records of a "rec" message, or the reason (one line) its sender breaks the protocol."""
    items = msg.get("r")
    if not isinstance(items, list) or len(items) > MAX_BATCH:
        return f"a record batch is not a list of at most {MAX_BATCH}"
    out = []
    for item in items:
        try:
            out.append(SignedRecord.from_wire(item))
        except ValueError as e:
            return f"malformed record: {e}"
    return out
