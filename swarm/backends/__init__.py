"""Training backends. Each is imported lazily by `load_backend`, so torch or mlx load only when used."""

from __future__ import annotations

from swarm import SwarmError
from swarm.backends.base import Backend

BACKENDS = ("torch", "mlx")


def load_backend(name: str, **kwargs) -> Backend:
    """Build the named backend; SwarmError (one line) if its framework is missing."""
    if name == "torch":
        try:
            from swarm.backends.torch_lora import TorchLoraBackend
        except ImportError as e:
            raise SwarmError(f"--backend torch needs torch, peft and transformers ({e.name} is missing): pip install -e .") from None
        return TorchLoraBackend(**kwargs)
    if name == "mlx":
        try:
            import mlx.core  # noqa: F401
        except ImportError:
            raise SwarmError('--backend mlx needs mlx: pip install -e ".[mlx]"') from None
        from swarm.backends.mlx_lora import MlxLoraBackend

        return MlxLoraBackend(**kwargs)
    raise SwarmError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
