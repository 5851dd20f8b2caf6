#!/usr/bin/env bash
# The main job, end to end on bundled data: sets up .venv (CPU torch), trains a small FAVOR+
# language model, saves it, reloads it through AutoModelForCausalLM and generates.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python scripts/demo.py "$@"
