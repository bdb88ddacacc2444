#!/usr/bin/env bash
# The browser of tests/test_ui.py: Debian's chromium and chromium-driver (selenium drives the system
# browser; nothing downloads a browser build of its own). Idempotent: does nothing when both are on
# PATH. Without root or apt it says so and succeeds: the ui test is then skipped with that reason.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-browser: chromium/chromedriver missing and no root apt-get here; tests/test_ui.py will be skipped" >&2
    echo "  (install them with: sudo apt-get install chromium chromium-driver)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "browser ready: $(chromium --version 2>/dev/null)"
