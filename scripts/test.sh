#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: lint, then pytest (the real-model tests and
# the headless-Chromium sandbox test included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/install_browser.sh
. .venv/bin/activate
ruff check bot tests bench
python -m pytest "$@"
