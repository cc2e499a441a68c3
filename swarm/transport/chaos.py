"""Fault injection shared by the transports (tests, scripts/bench_kill.py): never active unless asked for.

SWARM_CHAOS_DIE_SERVING=FILE: the one peer that takes (deletes) FILE is SIGKILLed as it serves a state
download, so a joiner's download loses its source mid-way.
"""

from __future__ import annotations

import os

from swarm.transport.base import StateProvider

DIE_SERVING = "SWARM_CHAOS_DIE_SERVING"


def die_when_serving(provider: StateProvider) -> StateProvider:
    """`provider`, or, with SWARM_CHAOS_DIE_SERVING set, one that kills this process if it takes the flag file."""
    flag = os.environ.get(DIE_SERVING)
    if not flag:
        return provider

    def serve():
        try:
            os.unlink(flag)  # one-shot: only one peer of a swarm takes it
        except OSError:
            return provider()
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    return serve
