#!/usr/bin/env bash
# The GPU stage benchmarks in one run (docs/benchmarks.md): SD 1.5's UNet at 512 px, SDXL's UNet at
# 1024 px and DeepFloyd IF's stages at their sizes, full fine-tuning and LoRA side by side, each
# printed as a table and written as JSON to OUT_FOLDER.
#   bash scripts/gpu_benchmarks.sh OUT_FOLDER            # PYTHON=... to use another interpreter
set -u
out=${1:?usage: bash scripts/gpu_benchmarks.sh OUT_FOLDER}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
for arch_and_size in "sd15-unet 512" "sdxl-unet 1024" "if-sized"; do
    set -- $arch_and_size
    echo "== $1 ${2:-(its own sizes)}"
    "$python" benchmarks/stages.py --arch "$1" ${2:+--resolution "$2"} --device cuda \
        --embedding-steps 5 --finetune-steps 5 --sample-steps 5 --json "$out/$1.json" || status=1
done
exit $status
