#!/usr/bin/env bash
# Set up, then run the whole test suite (real multi-process swarms on 127.0.0.1 included) with the
# Python that setup installed into; extra arguments go to pytest (e.g. a test file).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
scripts/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; exit 1; fi
exit "$rc"
