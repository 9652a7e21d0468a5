#!/usr/bin/env bash
# Start or continue the adaptation behind the embedded default model (smollm2-135m-did).
#
#   bash adaptation/smollm2-135m-did/train.sh                    # resumes from run/checkpoints
#   bash adaptation/smollm2-135m-did/train.sh --max-steps 2000   # any `did-engine train` option
#
# The data is rebuilt (deterministically) when absent; the run directory run/ is committed
# (metrics.jsonl, train_config.json, the latest delta checkpoint: adapter, optimizer, RNG
# states, data position), so the same command continues where the last session stopped.
# On a machine with AMX (lscpu: amx_bf16) or a GPU, --amp auto trains in bf16 autocast.
# Afterwards `python adaptation/smollm2-135m-did/export.py` copies the newest checkpoint's
# adapter into did_engine/pretrained/smollm2-135m-did/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${DATA:-$here/data/wiki_smollm2_L256}"
if [ ! -f "$data/manifest.json" ]; then
    did-engine data prepare --out "$data" --sources wiki --seq-len 256 \
        --tokenizer "$here/../../did_engine/pretrained/smollm2-135m-did/tokenizer.json"
fi
did-engine train --model smollm2-135m --data "$data" --out "$here/run" \
    --lora-rank 16 --lr 3e-4 --warmup-steps 20 --batch-size 8 --max-steps 4000 --ema 0 \
    --block-sizes 4:0.9,L:0.1 --log-every 5 --save-every 25 --keep-checkpoints 1 \
    --eval-every 100 --eval-batches 4 --eval-batch-size 8 "$@"
