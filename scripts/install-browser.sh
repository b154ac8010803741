#!/usr/bin/env bash
# Install Debian's Chromium for the end-to-end UI tests (tests/e2e), idempotently.
# Never downloads a Playwright browser: the tests launch /usr/bin/chromium.
#   scripts/install-browser.sh        # as root, or with sudo available
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1; then
    sudo="sudo -n"
else
    echo "install-browser: need root or sudo to apt-get install chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends chromium
command -v chromium
