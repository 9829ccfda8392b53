#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the sandbox's browser test (idempotent).
#
# The test drives it with Playwright for Python, launched with executable_path=/usr/bin/chromium:
# never run `playwright install`, which downloads a browser build of its own (unreachable here).
# Without root or apt-get this prints why and exits 0: the browser test then skips, saying so.
set -euo pipefail

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get here; install Chromium yourself (the browser test skips)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install_browser: not root and no sudo; cannot install chromium (the browser test skips)" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core fonts-noto-color-emoji
"$CHROMIUM" --version
