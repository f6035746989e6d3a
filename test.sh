#!/usr/bin/env bash
# The tests from a fresh clone: the project's environment (created or reused, see setup_env.sh), the linter, then
# the test suite on two processes. Extra arguments go to pytest (e.g. -m "not slow", or -k resume).
set -euo pipefail
cd "$(dirname "$0")"
source setup_env.sh
echo "test: ruff check . && ruff format --check ."
ruff check .
ruff format --check .
echo "test: python -m pytest -q -n 2 $*"
exec python -m pytest -q -n 2 "$@"
