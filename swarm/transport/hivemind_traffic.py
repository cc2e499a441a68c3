"""This peer's averaging traffic, counted where hivemind's averager writes and reads its p2p streams.

Every message the averager process exchanges with another peer (matchmaking, parts, averaged deltas)
goes through `P2P.send_protobuf` / `P2P.receive_protobuf`: a 1-byte marker, an 8-byte length and the
serialized protobuf. `install()` (in the averager's process, before it starts) wraps both and adds
each message's size, framing included, to `TRAFFIC`; state downloads (served or received) are not
averaging traffic and are left out. libp2p's own framing below the stream (noise, yamux: a few
percent) is not seen here.
"""

from __future__ import annotations

from hivemind.p2p import P2P
from hivemind.proto import averaging_pb2

FRAME_BYTES = 1 + P2P.HEADER_LEN
TRAFFIC = [0, 0]  # bytes sent, bytes received by this process's averager since the last `take()`
_NOT_AVERAGING = (averaging_pb2.DownloadRequest, averaging_pb2.DownloadData)


def install() -> None:
    """Count every stream message of this process (idempotent)."""
    send, receive = P2P.send_protobuf, P2P.receive_protobuf
    if getattr(send, "counted", False):
        return

    async def counted_send(protobuf, writer) -> None:
        await send(protobuf, writer)
        if not isinstance(protobuf, _NOT_AVERAGING):
            TRAFFIC[0] += FRAME_BYTES + protobuf.ByteSize()

    async def counted_receive(kind, reader):
        message, error = await receive(kind, reader)
        got = message if message is not None else error
        if got is not None and not isinstance(got, _NOT_AVERAGING):
            TRAFFIC[1] += FRAME_BYTES + got.ByteSize()
        return message, error

    counted_send.counted = True
    P2P.send_protobuf, P2P.receive_protobuf = staticmethod(counted_send), staticmethod(counted_receive)


def take() -> tuple[int, int]:
    """(bytes sent, bytes received) since the last call."""
    out = (TRAFFIC[0], TRAFFIC[1])
    TRAFFIC[0] = TRAFFIC[1] = 0
    return out
