"""network.log: one size-capped, rotated file per peer (security review, item 12: it never rotated, and any
peer can make another log a line per record it sends).

Both swarm's diagnostics and hivemind's go through one `logging.handlers.RotatingFileHandler` per file
and process (hivemind's forked processes inherit it, and rotate their own stream when it is full), so the
log takes at most about (BACKUPS + 1) x MAX_BYTES per process.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

MAX_BYTES = 16 << 20
BACKUPS = 2
_handlers: dict[Path, logging.Handler] = {}


def log_handler(path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> logging.Handler:
    """The rotating handler of `path` in this process (the same object for every logger that writes there)."""
    path = Path(path).resolve()
    if path not in _handlers:
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
        _handlers[path] = handler
    return _handlers[path]
