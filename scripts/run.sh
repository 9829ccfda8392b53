#!/usr/bin/env bash
# Set up (if needed) and start Apprentice on its embedded defaults: the local Slack sandbox in
# your browser (SQLite file, the packaged SmolLM2 model). For a real workspace use
# `apprentice run` with SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
exec apprentice sandbox "$@"
