"""swarm: train LoRA adapters together on consumer hardware, peer to peer.

Nothing heavy is imported here: torch, mlx and hivemind are imported lazily by the
modules that need them, so `import swarm` is cheap and side-effect free.
"""

__version__ = "0.1.0"

#: Bumped whenever what crosses the network (records, averaged tensors, state) changes shape.
PROTOCOL_VERSION = 1


class SwarmError(Exception):
    """An error the user can act on: printed as one line, never as a traceback."""
