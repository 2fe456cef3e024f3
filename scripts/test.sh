#!/usr/bin/env bash
# Sets up the environment if needed, then runs the test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The web app's browser test drives Debian's Chromium (no test tool may download a browser here);
# as root it is installed; where it cannot be, that test says how and is skipped.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
        || echo "scripts/test.sh: could not install Debian's chromium; the browser test will be skipped" >&2
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1
exec python -m pytest "$@"
