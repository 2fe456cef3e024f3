#!/usr/bin/env bash
# The GPU stage benchmarks in one run (docs/benchmarks.md): each architecture's edit with full fine-tuning and
# LoRA side by side (benchmarks/stages.py), then per family the whole edit a user waits for, at the paper's
# recipe beside the family's defaults (--recipes paper defaults: every step run, sampled as imagic edit samples),
# each printed as a table and written as JSON to OUT_FOLDER.
#   bash scripts/gpu_benchmarks.sh OUT_FOLDER                 # every architecture and family below
#   bash scripts/gpu_benchmarks.sh OUT_FOLDER "flux 1024 --methods lora"   # chosen ones: ARCH SIZE [OPTIONS]
#   bash scripts/gpu_benchmarks.sh OUT_FOLDER "sd15-unet 512 --methods full --recipes paper defaults"
# PYTHON=... to use another interpreter. FLUX.1's transformer (11.9B) is fully fine-tuned as a quarter of its
# blocks: the whole would need about 200 GB. A whole edit at the paper's recipe runs 1000-1500 optimiser steps:
# minutes per family (SD 1.5 at 512 px about 3 min, SDXL at 1024 px about 8 min on an H200, projected).
set -u
out=${1:?usage: bash scripts/gpu_benchmarks.sh OUT_FOLDER [\"ARCH SIZE [OPTIONS]\" ...]}
shift
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ $# -eq 0 ]; then
    whole="--recipes paper defaults"  # each family's own method (imagic/families/): full for SD 1.5, else LoRA
    set -- "sd15-unet 512" "sdxl-unet 1024" "if-sized" "sd35-medium 1024" "flux 1024 --methods lora" \
        "flux 1024 --block-fraction 0.25" \
        "sd15-unet 512 --methods full $whole" "sdxl-unet 1024 --methods lora $whole" "if-sized --methods lora $whole" \
        "sd35-medium 1024 --methods lora $whole" "flux 1024 --methods lora $whole"
fi
status=0
for spec in "$@"; do
    read -r arch size options <<<"$spec"
    case $size in --*) options="$size ${options:-}"; size="" ;; esac  # no size given: the model's own
    name=$(echo "$spec" | tr -s ' ' '_' | tr -d -c 'A-Za-z0-9._-')
    echo "== $spec"
    # shellcheck disable=SC2086  # options are words
    "$python" benchmarks/stages.py --arch "$arch" ${size:+--resolution "$size"} ${options:-} --device cuda \
        --embedding-steps 5 --finetune-steps 5 --sample-steps 5 --json "$out/$name.json" || status=1
done
exit $status
