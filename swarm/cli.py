"""Command-line plumbing shared by the swarm tools."""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), not a usage block."""

    def error(self, message: str):
        print(f"{self.prog.removeprefix('python -m ')}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
