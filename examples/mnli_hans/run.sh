#!/usr/bin/env bash
# The main job: set up .venv, fine-tune MiniLM on the bundled MNLI sample, validate on MNLI and HANS,
# and run FastIF on HANS errors, logging to an offline W&B run and to JSON Lines under runs/mnli_hans.
# Pass another config as the first argument, for example examples/mnli_hans/quick.yaml.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
. .venv/bin/activate
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
python -m lightning_fastif fit --config "${1:-examples/mnli_hans/config.yaml}"
