#!/usr/bin/env bash
# Install swarm and its dependencies. torch is pinned first so pip never pulls a multi-GB CUDA build
# on a CPU-only machine (set SWARM_TORCH to choose another torch, e.g. "torch" on a CUDA box).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "${SWARM_TORCH:-torch==2.13.0}"
extras="test"
if "$PY" -c 'import platform, sys; sys.exit(0 if platform.system() in ("Linux", "Darwin") else 1)'; then extras="test,mlx"; fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
