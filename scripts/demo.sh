#!/usr/bin/env bash
# Sets up the environment if needed, then edits examples/person.png ("a photo of a red person
# standing") into "a photo of a red person sitting" with the built-in shapes model: trains the
# edit with the model's measured defaults, samples five etas (0 is the reconstruction) for two
# seeds, and writes images, grid, state and summary to outputs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
imagic edit examples/person.png "a photo of a red person sitting" --model shapes --out outputs/demo --overwrite \
    --eta 0 0.8 1.0 1.2 1.4 --seed 0 1 "$@"
