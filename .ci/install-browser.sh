#!/bin/sh
# Debian's Chromium for tests/test_demo.py: Playwright (a test extra) drives it, since
# `playwright install` cannot download browsers here; the test launches /usr/bin/chromium.
# Run as root.
set -eu
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
    apt-get update
    apt-get install -y chromium
fi
