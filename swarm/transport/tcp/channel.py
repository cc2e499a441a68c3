"""Authenticated, encrypted, framed connections between two peers (asyncio streams).

Encryption: TLS 1.3 (stdlib `ssl`). The listener presents a self-signed certificate made from its
Ed25519 identity key; the dialer accepts any certificate (no CA can vouch for a peer id) and then
*pins* it: the peer id derived from the certificate's public key must be the one in the address
dialed. TLS itself proves that the listener holds that key (its CertificateVerify signature).

Dialer authentication: stdlib TLS cannot accept a self-signed *client* certificate (the server sees
one only with chain validation on), so the dialer proves its id inside the encrypted channel:

    listener -> dialer   {"t": "hello", "v": 1, "id": listener id, "n": 32 random bytes}
    dialer   -> listener {"t": "auth",  "v": 1, "id": dialer id, "n": 32 random bytes,
                          "s": Ed25519 signature of AUTH | listener id | dialer id | both nonces,
                          "m": swarm-key HMAC (role "dialer"), private swarms only,
                          "p": the service this connection is for (e.g. "state"); absent: gossip}
    listener -> dialer   {"t": "ok", "m": swarm-key HMAC (role "listener"), private swarms only}

The signature names the listener the dialer verified and the listener's fresh nonce, so it cannot be
replayed to another listener or in another session. Private swarms: each side sends
HMAC(swarm key, LABEL | role | listener id | dialer id | both nonces) and checks the other's;
a stranger's connection is closed before any record moves. The whole handshake is bounded by
`timeout` seconds.

Frames: a 4-byte big-endian length, then a msgpack map with a string "t" (its type). The length is
checked against `max_frame` (64 KiB until the handshake is done) before a byte of the body is read
or buffered, and the body must follow within `body_timeout` seconds. An oversized, truncated, late
or undecodable frame raises `ChannelError` (one line), which callers turn into closing the
connection, never into a crash.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import os
import secrets
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from swarm.key import SwarmKey
from swarm.transport.tcp.identity import Identity, peer_id_of_key, verify

__all__ = ["Channel", "ChannelError", "Collision", "TlsContexts", "dial", "accept", "encode", "decode", "MAX_FRAME"]

MAX_FRAME = 4 << 20          # bytes of one frame's body, at most (default; each channel may set its own)
HANDSHAKE_TIMEOUT = 10.0     # seconds for TLS plus the auth exchange
BODY_TIMEOUT = 30.0          # seconds for a frame's body to arrive once its header has (a truncated frame ends there)
HANDSHAKE_FRAME = 64 << 10   # handshake messages are small: the cap until the peer is authenticated
LABEL = b"swarm-tcp/1"
AUTH = LABEL + b"|auth"
NONCE_BYTES = 32
MAX_SERVICE_CHARS = 32       # a service name (auth "p")
VERSION = 1


class ChannelError(Exception):
    """A connection failed or a peer broke the protocol: one line saying why."""


class Collision(ChannelError):
    """`dial(strict_local=True)`: the connection from `local` to that address would reuse a 4-tuple in use."""


def encode(msg: dict, max_frame: int = MAX_FRAME) -> bytes:
    """One frame (length header included) carrying `msg`; ValueError if its body exceeds `max_frame`."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > max_frame:
        raise ValueError(f"a {len(body)}-byte frame exceeds the {max_frame}-byte limit")
    return len(body).to_bytes(4, "big") + body


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not allowed")


def decode(body: bytes) -> dict:
    """The message in a frame body; ChannelError if it is not a msgpack map with a string "t"."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext, use_list=True)
    except Exception as e:  # FormatError, StackError, ExtraData, UnicodeDecodeError, ValueError...
        raise ChannelError(f"undecodable frame ({type(e).__name__})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ChannelError("a frame is not a map with a string type")
    return msg


class TlsContexts:
    """This peer's TLS settings: a certificate of its identity key (listener), no verification (dialer)."""

    def __init__(self, identity: Identity) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(identity.public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=3650)).sign(identity.key, None))
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.minimum_version = ssl.TLSVersion.TLSv1_3
        with tempfile.TemporaryDirectory(prefix="swarm-tls-") as tmp:  # ssl loads a certificate from files only
            cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(identity.to_pem())
            self.server.load_cert_chain(cert_file, key_file)
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client.minimum_version = ssl.TLSVersion.TLSv1_3
        self.client.check_hostname = False
        self.client.verify_mode = ssl.CERT_NONE  # pinned by peer id after the handshake (`_listener_id`)


class Channel:
    """One authenticated connection: `send`/`recv` whole messages; `close` is idempotent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer_id: str, dialer: bool,
                 max_frame: int = MAX_FRAME) -> None:
        self.reader, self.writer = reader, writer
        self.peer_id = peer_id
        self.dialer = dialer          # True: this side dialed
        self.max_frame = max_frame
        self.body_timeout = BODY_TIMEOUT
        self._send_lock = asyncio.Lock()
        self.closed = False
        self.service: str | None = None  # what the dialer opened it for (`dial(service=...)`); None: gossip

    async def recv(self, idle_timeout: float | None = None) -> dict:
        """The next message; ChannelError if none starts within `idle_timeout` seconds (None: no limit)."""
        header = await self._read(4, idle_timeout, f"the peer was silent for {idle_timeout}s", first=True)
        size = int.from_bytes(header, "big")
        if size > self.max_frame:
            raise ChannelError(f"a frame announced {size} bytes (limit {self.max_frame})")
        body = await self._read(size, self.body_timeout, f"a {size}-byte frame did not arrive within {self.body_timeout:g}s")
        return decode(body)

    async def _read(self, n: int, timeout: float | None, late: str, first: bool = False) -> bytes:
        try:
            return await asyncio.wait_for(self.reader.readexactly(n), timeout)
        except asyncio.TimeoutError:
            raise ChannelError(late) from None
        except asyncio.IncompleteReadError as e:
            raise ChannelError("connection closed" if first and not e.partial else "connection closed mid-frame") from None
        except (ConnectionError, OSError, ssl.SSLError) as e:
            raise ChannelError(f"connection lost ({type(e).__name__})") from None

    async def send(self, msg: dict) -> None:
        frame = encode(msg, self.max_frame)
        async with self._send_lock:
            if self.closed:
                raise ChannelError("connection closed")
            try:
                self.writer.write(frame)
                await self.writer.drain()
            except (ConnectionError, OSError, RuntimeError, ssl.SSLError) as e:
                raise ChannelError(f"connection lost ({type(e).__name__})") from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.writer.close()
            except Exception:
                pass


def _listener_id(writer: asyncio.StreamWriter) -> str:
    """The peer id of the TLS certificate the listener presented (its key proven by TLS)."""
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        raise ChannelError("the listener presented no certificate")
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        raise ChannelError("the listener's certificate does not parse") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ChannelError("the listener's certificate is not an Ed25519 key")
    return peer_id_of_key(key)


def _proof(role: bytes, listener: str, dialer: str, n1: bytes, n2: bytes) -> tuple[bytes, ...]:
    """What a swarm-key HMAC covers (`SwarmKey.mac(*parts)`, length-prefixed parts)."""
    return LABEL, role, listener.encode(), dialer.encode(), n1, n2


def _field(msg: dict, name: str, kind: type, size: int | None = None) -> Any:
    value = msg.get(name)
    if not isinstance(value, kind) or (size is not None and len(value) != size):
        raise ChannelError(f"handshake field {name!r} is missing or malformed")
    return value


REUSEPORT = hasattr(socket, "SO_REUSEPORT")  # not on Windows
_COLLISION = {errno.EADDRINUSE, errno.EADDRNOTAVAIL}


async def _connect_from(host: str, port: int, local: tuple[str, int], strict: bool = False) -> socket.socket | None:
    """A socket connected to `host:port` from the local address `local` (this peer's listen address: a
    link emulator, `swarm.links`, tells peers apart by the port they dial from, as libp2p's reuseport
    dialing does). None where the platform has no SO_REUSEPORT, or where this 4-tuple is taken (a
    second connection to the same remote address at once, or one still in TIME_WAIT): the caller then
    dials from an ephemeral port."""
    if not REUSEPORT:
        return None
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return None
    local_family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    targets = [i[4] for i in infos if i[0] == local_family]
    if not targets:
        return None
    sock = socket.socket(local_family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind(local)
        await loop.sock_connect(sock, targets[0])
        return sock
    except OSError as e:
        sock.close()
        if e.errno in _COLLISION:
            if strict:
                raise Collision(f"a connection from {local[0]}:{local[1]} to {host}:{port} is open already") from None
            return None
        raise
    except BaseException:
        sock.close()
        raise


async def dial(host: str, port: int, expected: str | None, identity: Identity, tls: TlsContexts,
               swarm_key: SwarmKey | None = None, timeout: float = HANDSHAKE_TIMEOUT,
               max_frame: int = MAX_FRAME, service: str | None = None,
               local: tuple[str, int] | None = None, strict_local: bool = False) -> Channel:
    """Connect to `host:port` and check that the peer there is `expected` (None: whoever it is).
    `service`: a connection for one service of the listener (`TcpNode.register_service`), not gossip.
    `local`: dial from this (host, port), this peer's listen address, where the platform allows it and
    the connection does not collide with another (`_connect_from`); else from an ephemeral port, or with
    `strict_local`, `Collision` (the caller may try another address of that peer first)."""
    try:
        return await asyncio.wait_for(_dial(host, port, expected, identity, tls, swarm_key, max_frame, service, local,
                                            strict_local),
                                      timeout)
    except asyncio.TimeoutError:
        raise ChannelError(f"no handshake with {host}:{port} within {timeout:g}s") from None
    except (OSError, ssl.SSLError) as e:
        raise ChannelError(f"cannot connect to {host}:{port}: {e.strerror or type(e).__name__}") from None


async def _dial(host, port, expected, identity, tls, swarm_key, max_frame, service=None, local=None,
                strict_local=False) -> Channel:
    sock = await _connect_from(host, port, local, strict_local) if local is not None else None
    if sock is not None:
        reader, writer = await asyncio.open_connection(sock=sock, ssl=tls.client, server_hostname=host)
    else:
        reader, writer = await asyncio.open_connection(host, port, ssl=tls.client, server_hostname=host)
    ch = Channel(reader, writer, "", dialer=True, max_frame=min(max_frame, HANDSHAKE_FRAME))
    try:
        listener = _listener_id(writer)
        if expected is not None and listener != expected:
            raise ChannelError(f"{host}:{port} is peer {listener}, not {expected} as its address says")
        hello = await ch.recv()
        if hello.get("t") != "hello" or hello.get("v") != VERSION or hello.get("id") != listener:
            raise ChannelError(f"{host}:{port} sent no valid hello")
        n1, n2 = _field(hello, "n", bytes, NONCE_BYTES), secrets.token_bytes(NONCE_BYTES)
        me = identity.peer_id
        auth = {"t": "auth", "v": VERSION, "id": me, "n": n2,
                "s": identity.sign(b"|".join([AUTH, listener.encode(), me.encode(), n1, n2]))}
        if swarm_key is not None:
            auth["m"] = swarm_key.mac(*_proof(b"dialer", listener, me, n1, n2))
        if service is not None:
            auth["p"] = service
        await ch.send(auth)
        try:
            ok = await ch.recv()
        except ChannelError:
            raise ChannelError(f"peer {listener} refused the connection"
                               + (" (a different swarm key?)" if swarm_key is not None else " (a private swarm?)")) from None
        if ok.get("t") != "ok":
            raise ChannelError(f"peer {listener} sent no valid handshake reply")
        if swarm_key is not None and not swarm_key.check(ok.get("m"), *_proof(b"listener", listener, me, n1, n2)):
            raise ChannelError(f"peer {listener} is not in this private swarm (its swarm-key proof is wrong or missing)")
        ch.peer_id, ch.max_frame, ch.service = listener, max_frame, service
        return ch
    except BaseException:
        ch.close()
        raise


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity,
                 swarm_key: SwarmKey | None = None, timeout: float = HANDSHAKE_TIMEOUT,
                 max_frame: int = MAX_FRAME) -> Channel:
    """Authenticate a dialer on a connection TLS has already accepted; ChannelError (closed) if it fails."""
    ch = Channel(reader, writer, "", dialer=False, max_frame=min(max_frame, HANDSHAKE_FRAME))
    try:
        return await asyncio.wait_for(_accept(ch, identity, swarm_key, max_frame), timeout)
    except asyncio.TimeoutError:
        ch.close()
        raise ChannelError(f"no handshake within {timeout:g}s") from None
    except BaseException:
        ch.close()
        raise


async def _accept(ch: Channel, identity: Identity, swarm_key: SwarmKey | None, max_frame: int) -> Channel:
    me, n1 = identity.peer_id, secrets.token_bytes(NONCE_BYTES)
    await ch.send({"t": "hello", "v": VERSION, "id": me, "n": n1})
    auth = await ch.recv()
    if auth.get("t") != "auth" or auth.get("v") != VERSION:
        raise ChannelError("the dialer sent no valid auth message")
    dialer, n2 = _field(auth, "id", str), _field(auth, "n", bytes, NONCE_BYTES)
    if dialer == me:
        raise ChannelError("the dialer claims this peer's own id")
    if not verify(dialer, auth.get("s"), b"|".join([AUTH, me.encode(), dialer.encode(), n1, n2])):
        raise ChannelError("the dialer's auth signature does not match its claimed peer id")
    ok: dict = {"t": "ok"}
    if swarm_key is not None:
        if not swarm_key.check(auth.get("m"), *_proof(b"dialer", me, dialer, n1, n2)):
            raise ChannelError(f"peer {dialer} is not in this private swarm (wrong or missing swarm-key proof)")
        ok["m"] = swarm_key.mac(*_proof(b"listener", me, dialer, n1, n2))
    service = auth.get("p")
    if service is not None and not (isinstance(service, str) and 0 < len(service) <= MAX_SERVICE_CHARS):
        raise ChannelError("the dialer named a malformed service")
    await ch.send(ok)
    ch.peer_id, ch.max_frame, ch.service = dialer, max_frame, service
    return ch
