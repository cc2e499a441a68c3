"""What a peer tells its user: one line per round on the console, one JSON object per round on disk."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class Reporter:
    """Console lines prefixed with the peer and round; plain text when stdout is not a terminal."""

    def __init__(self, peer: str, stream=None) -> None:
        from rich.console import Console

        self.peer = peer[:8]
        self.console = Console(file=stream or sys.stdout, highlight=False, soft_wrap=True)

    def say(self, msg: str, round_: int | None = None) -> None:
        where = f"peer {self.peer}" + (f" r{round_}" if round_ is not None else "")
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] [bold]{where}[/bold] {msg}", markup=True)
        self.console.file.flush()

    def warn(self, msg: str, round_: int | None = None) -> None:
        self.say(f"[yellow]{msg}[/yellow]", round_)


class MetricsFile:
    """Append-only metrics.jsonl: each line is flushed and fsynced, so a kill loses at most the line being written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, allow_nan=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics file (a torn last line is skipped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out
