#!/usr/bin/env bash
# The project's test command: set up .venv if needed, check style, run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k prepare).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$("$repo/scripts/setup_env.sh" | tail -n 1)
cd "$repo"
"$py" -m ruff check lcpn scripts tests
"$py" -m ruff format --check --quiet lcpn scripts tests
"$py" -m pytest "$@"
