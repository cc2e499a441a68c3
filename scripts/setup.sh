#!/usr/bin/env bash
# Install swarm and its dependencies into one Python environment, and record it for scripts/python:
#   - the virtualenv or conda env the python3 on PATH runs in, if it runs in one;
#   - otherwise the project's own virtualenv .venv (created here from python3, or python), so a system
#     Python that refuses pip installs (PEP 668, "externally-managed-environment") is never touched.
# SWARM_PYTHON=/path/to/python installs into that interpreter instead. torch is installed first, pinned
# (SWARM_TORCH, default torch==2.13.0), so pip never pulls a multi-GB CUDA build by accident (set
# SWARM_TORCH=torch on a CUDA machine).
# `bash scripts/setup.sh --check` prints the interpreter it would install into, and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: bash scripts/setup.sh [--check]" >&2; exit 2 ;;
esac
die() { echo "setup.sh: $*" >&2; exit 1; }

# One probe per interpreter: "MAJOR.MINOR VERSION_OK IN_ENV HAS_VENV EXECUTABLE".
probe='import os, sys
try:
    import venv, ensurepip
    has_venv = 1
except ImportError:
    has_venv = 0
in_env = int(sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta")))
print("%d.%d" % sys.version_info[:2], int(sys.version_info >= (3, 10)), in_env, has_venv, sys.executable)'

if [ -n "${SWARM_PYTHON:-}" ]; then
  base=$SWARM_PYTHON
else
  base=
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1; then base=$c; break; fi
  done
  [ -n "$base" ] || die "no python3 on PATH: install Python >= 3.10 (Debian/Ubuntu: sudo apt install python3 python3-venv; macOS: https://www.python.org or brew install python)"
fi
info=$("$base" -c "$probe" 2>/dev/null) || die "$base is not a working Python >= 3.10"
read -r ver ver_ok in_env has_venv exe <<<"$info"
[ "$ver_ok" = 1 ] || die "$base is Python $ver: swarm needs Python >= 3.10"

venv_py=$root/.venv/bin/python
if [ -n "${SWARM_PYTHON:-}" ] || [ "$in_env" = 1 ]; then
  py=$exe
  where="$exe (Python $ver)"
  make_venv=0
else
  py=$venv_py
  where="$root/.venv (Python $ver, from $exe)"
  make_venv=1
  # An existing .venv is reused when its Python and pip work (a failed or stale one is made again).
  if [ -x "$venv_py" ] && "$venv_py" -m pip --version >/dev/null 2>&1; then make_venv=0; fi
  if [ "$make_venv" = 1 ] && [ "$has_venv" = 0 ]; then
    die "$exe (Python $ver) cannot create the project virtualenv .venv: its venv/ensurepip module is missing; install it (Debian/Ubuntu: sudo apt install python$ver-venv) or activate a virtualenv or conda env, then rerun"
  fi
fi
if [ "$check" = 1 ]; then
  echo "$py"
  exit 0
fi

if [ "$make_venv" = 1 ]; then
  echo "setup.sh: creating the project virtualenv .venv with $exe (Python $ver)"
  if ! err=$("$exe" -m venv --clear "$root/.venv" 2>&1); then
    rm -rf "$root/.venv"
    die "$exe -m venv .venv failed: $(printf '%s\n' "$err" | grep -v '^\s*$' | tail -n 1)"
  fi
fi
echo "setup.sh: installing swarm into $where"
pipi() { "$py" -m pip install --quiet --disable-pip-version-check "$@"; }
# PyPI's Linux torch wheel is a CUDA build (GBs of nvidia packages): without an NVIDIA GPU, take the
# CPU build from PyTorch's own index (pip prefers 2.13.0+cpu there; where that index is unreachable,
# a local wheel or PyPI still serves). macOS wheels on PyPI are CPU/MPS builds already.
cpu_index=https://download.pytorch.org/whl/cpu
torch_index=()
if [ -z "${SWARM_TORCH:-}" ] && [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1 &&
   "$py" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1] + '/torch/', timeout=5)" "$cpu_index" 2>/dev/null; then
  torch_index=(--extra-index-url "$cpu_index")
fi
pipi ${torch_index[@]+"${torch_index[@]}"} "${SWARM_TORCH:-torch==2.13.0}"
extras="test,data,qlora"
if "$py" -c 'import platform, sys; sys.exit(0 if platform.system() in ("Linux", "Darwin") else 1)'; then extras="test,data,mlx,qlora"; fi
pipi -e ".[${extras}]"
# scripts/python runs this interpreter from now on.
printf '%s\n' "$py" >"$root/.swarm-python"
echo "setup.sh: done; run swarm's commands with scripts/python (e.g. scripts/python -m swarm.join)"
