#!/bin/sh
# What tests/test_demo.py needs beyond the package: Gradio, Playwright for Python, and Debian's
# Chromium for Playwright to drive (`playwright install` cannot download browsers here; the test
# launches /usr/bin/chromium). Run as root, with the test environment's venv active (or PYTHON
# naming its interpreter): the Python packages go into that interpreter.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x /usr/bin/chromium ]; then
    apt-get update
    apt-get install -y chromium
fi
# -c constraints.txt: these must not move torch, modelscope or the other pins
"$PYTHON" -m pip install -c constraints.txt gradio==6.31.0 playwright==1.65.2
