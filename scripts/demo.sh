#!/usr/bin/env bash
# Sets up the environment if needed, then runs one whole edit (train, sample, write) on
# examples/example.png. Until the built-in shapes model ships, the model is a tiny
# untrained one: this shows the pipeline end to end in seconds; its images are noise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
model=.cache/toy-sd1
[ -f "$model/model_index.json" ] || python -m imagic.toy "$model"
imagic edit examples/example.png "a photo of a red dog sitting" --model "$model" --out outputs/demo --overwrite \
    --method lora --embedding-steps 30 --finetune-steps 30 --steps 10 --eta 0.4 0.7 1.0 --seed 0 1 "$@"
