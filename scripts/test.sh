#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, the real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check bot tests
python -m pytest "$@"
