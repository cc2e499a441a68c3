"""An asyncio event loop on its own daemon thread, with plain synchronous calls into it.

STYLE habit 4: the training loop is synchronous, the network is not. Like hivemind's DHT (which
uses a process), the TCP node runs its event loop apart from the caller and hands back results;
a thread is enough here (the node's work is small and mostly waiting) and works the same on
Windows. uvloop's loop where it imports (not on Windows), asyncio's default loop elsewhere.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine

__all__ = ["LoopThread", "new_event_loop"]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """`call(coro)` runs a coroutine on the loop and returns its result (or raises its exception)."""

    def __init__(self, name: str) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine, timeout: float = 30.0) -> Any:
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the node has been shut down")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, last: Coroutine | None = None, timeout: float = 10.0) -> None:
        """Run `last` (the node's own cleanup), stop the loop, end the thread. Idempotent."""
        if self.loop.is_closed():
            if last is not None:
                last.close()
            return
        if self.loop.is_running():
            if last is not None:
                try:
                    self.call(last, timeout)
                except Exception:
                    pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        elif last is not None:
            last.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)
        if not self._thread.is_alive():
            self.loop.close()
