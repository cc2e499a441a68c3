"""`python -m swarm.status --serve`: the swarm, live, in a browser.

Why: a terminal table shows one moment; a dashboard shows the swarm moving: who trains on what,
at what speed, with what quota, in which state, and every peer's loss curve. It reads the same
validated DHT records as `swarm.status` and serves, on 127.0.0.1 unless told otherwise:

    GET /             one self-contained page (HTML + JS, no CDN: it works without internet)
    GET /api/swarm    the latest snapshot: the same JSON as `swarm.status --json`
    GET /api/history  {run: {peer_id: [[round, loss], ...]}}: the losses seen since the server started

Everything shown comes from other peers, so the page only ever sets text (never HTML) and its
Content-Security-Policy allows its own inline script and nothing else. One asyncio event loop
(uvloop's where it is installed) serves HTTP; DHT reads are blocking calls, made by one worker
thread every `refresh` seconds, so a slow DHT never stalls a page. The HTTP side is deliberately
small: GET only, one request per connection, a request head of at most 16 KiB read within 5 s.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from swarm import SwarmError

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 5.0
MAX_POINTS = 2000   # losses kept per peer (the oldest rounds go first)
MAX_PEERS = 512     # peers with a loss curve per run


@dataclass(frozen=True)
class DashboardSettings:
    """What `--serve`, `--listen`, `--port` and `--refresh` decided (built once in swarm.status.main)."""

    listen: str = "127.0.0.1"  #: address to serve on; loopback by default (anyone who can reach it sees the swarm)
    port: int = 8000           #: TCP port; 0 = any free port (the printed URL says which)
    refresh: float = 2.0       #: seconds between two reads of the DHT

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SwarmError(f"--port {self.port} is not in 0..65535")
        if not 0.2 <= self.refresh <= 3600:
            raise SwarmError(f"--refresh {self.refresh} is not in 0.2..3600 seconds")


class LossHistory:
    """Each peer's loss by round, from successive snapshots (bounded: MAX_POINTS rounds, MAX_PEERS peers per run)."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, dict[int, float]]] = {}

    def add(self, snapshot: dict) -> None:
        for run in snapshot.get("runs", []):
            curves = self.runs.setdefault(run["name"], {})
            for p in run["peers"]:
                if p.get("loss") is None or p.get("round", 0) < 1:
                    continue
                if p["peer_id"] not in curves and len(curves) >= MAX_PEERS:
                    continue
                curve = curves.setdefault(p["peer_id"], {})
                curve[p["round"]] = p["loss"]
                while len(curve) > MAX_POINTS:
                    del curve[min(curve)]

    def to_dict(self) -> dict:
        return {run: {peer: sorted(curve.items()) for peer, curve in sorted(curves.items())}
                for run, curves in sorted(self.runs.items())}


def page() -> tuple[bytes, str]:
    """The page, and the CSP that allows exactly its inline script."""
    html = resources.files("swarm").joinpath("dashboard.html").read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), csp


class Dashboard:
    def __init__(self, read: Callable[[], dict], settings: DashboardSettings) -> None:
        self.read, self.settings = read, settings
        self.snapshot: dict = {"time": 0.0, "runs": []}
        self.history = LossHistory()
        self.error: str | None = None
        self.page, self.csp = page()

    async def poll(self) -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dht-reader") as reader:
            while True:
                try:
                    snapshot = await loop.run_in_executor(reader, self.read)
                except Exception as e:  # the DHT may hiccup: keep serving the last snapshot, retry next time
                    self.error = str(e).splitlines()[0] if str(e) else type(e).__name__
                else:
                    self.snapshot, self.error = snapshot, None
                    self.history.add(snapshot)
                await asyncio.sleep(self.settings.refresh)

    def route(self, method: str, path: str) -> tuple[str, str, bytes, dict]:
        """(status, content type, body, extra headers) for one request."""
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n", {"Allow": "GET"}
        path = path.split("?", 1)[0]
        if path == "/":
            return "200 OK", "text/html; charset=utf-8", self.page, {"Content-Security-Policy": self.csp}
        if path == "/api/swarm":
            return "200 OK", "application/json", json.dumps(self.snapshot, sort_keys=True).encode(), {}
        if path == "/api/history":
            return "200 OK", "application/json", json.dumps(self.history.to_dict()).encode(), {}
        return "404 Not Found", "text/plain", b"not found\n", {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                status, ctype, body, extra = "400 Bad Request", "text/plain", b"bad request\n", {}
            else:
                status, ctype, body, extra = self.route(parts[0], parts[1])
            headers = {"Content-Type": ctype, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                       "X-Content-Type-Options": "nosniff", "Connection": "close", **extra}
            writer.write(f"HTTP/1.1 {status}\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
                         + b"\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError):
            pass  # a slow, oversized or broken request: drop the connection
        finally:
            writer.close()

    async def serve(self, stop: asyncio.Event, started: Callable[[str], None]) -> None:
        s = self.settings
        try:
            server = await asyncio.start_server(self.handle, s.listen, s.port, limit=HEAD_LIMIT)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SwarmError(f"port {s.port} on {s.listen} is already in use: pick another --port") from None
            raise SwarmError(f"cannot serve on {s.listen}:{s.port}: {e.strerror or e}") from None
        host, port = server.sockets[0].getsockname()[:2]
        started(f"http://{f'[{host}]' if ':' in host else host}:{port}/")
        poller = asyncio.ensure_future(self.poll())
        async with server:
            await stop.wait()
        poller.cancel()


def new_event_loop() -> tuple[asyncio.AbstractEventLoop, str]:
    """uvloop's event loop where it is installed (not on Windows), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop(), "asyncio"
    return uvloop.new_event_loop(), "uvloop"


def serve(read: Callable[[], dict], settings: DashboardSettings, started: Callable[[str, str], None]) -> None:
    """Serve until SIGINT or SIGTERM. `read()` returns a fresh snapshot; `started(url, loop_name)` once listening."""
    loop, loop_name = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # Windows' loop has no signal handlers: Ctrl-C still stops it
                pass
        loop.run_until_complete(Dashboard(read, settings).serve(stop, lambda url: started(url, loop_name)))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
