#!/usr/bin/env bash
# Sets up the environment if needed, then runs the test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
exec python -m pytest "$@"
