#!/usr/bin/env bash
# What `make test` needs from the system besides the virtualenv, so that a README set-up skips no test:
#   - the browser of tests/test_ui.py: Debian's chromium and chromium-driver (selenium drives the
#     system browser; nothing downloads a browser build of its own);
#   - a Go toolchain for tests/test_package.py, which runs the Modelfile's TEMPLATE through Go's
#     text/template (Ollama's template engine) to prove it renders as the Jinja template: Debian's golang-go.
# Idempotent: installs only what is missing from PATH. Without root or apt it says what is missing and
# succeeds: those tests are then skipped, each saying why.
set -euo pipefail
missing=()
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    missing+=(chromium chromium-driver)
fi
if ! command -v go >/dev/null; then
    missing+=(golang-go)
fi
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-browser: ${missing[*]} missing and no root apt-get here; tests/test_ui.py's browser test" >&2
    echo "  and tests/test_package.py's Go template test will be skipped where theirs is missing" >&2
    echo "  (install them with: sudo apt-get install ${missing[*]})" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v chromium >/dev/null && echo "browser ready: $(chromium --version 2>/dev/null)"
command -v go >/dev/null && echo "go ready: $(go version)"
exit 0
