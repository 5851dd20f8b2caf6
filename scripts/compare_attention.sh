#!/usr/bin/env bash
# FAVOR+ against the same models with exact softmax attention, same budget and seed, on the three
# tasks (README "Results"). Writes outputs/compare/<task>-<attention>/metrics.json.
# STEPS_SCALE=2 doubles every budget.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python scripts/prepare_data.py
[ -f data_cache/bible/tokenizer/tokenizer.json ] || \
    python scripts/train_tokenizer.py --corpus data_cache/bible/train.jsonl --fields en es --output data_cache/bible/tokenizer
s=${STEPS_SCALE:-1}
for attention in favor softmax; do
    out=outputs/compare
    python scripts/train.py --task clm --attention-type $attention --max-steps $((400 * s)) --eval-steps 200 \
        --batch-size 16 --seq-len 128 --learning-rate 2e-3 --output $out/clm-$attention --quiet
    python scripts/train.py --task mlm --attention-type $attention --max-steps $((400 * s)) --eval-steps 200 \
        --batch-size 16 --seq-len 128 --learning-rate 2e-3 --output $out/mlm-$attention --quiet
    python scripts/train.py --task classification --init $out/mlm-$attention --max-steps $((300 * s)) --eval-steps 150 \
        --batch-size 32 --seq-len 128 --learning-rate 5e-4 --output $out/cls-$attention --quiet
    python scripts/train.py --task seq2seq --attention-type $attention --tokenizer data_cache/bible/tokenizer \
        --max-steps $((600 * s)) --eval-steps 300 --batch-size 16 --seq-len 64 --learning-rate 2e-3 \
        --bleu-rows 300 --output $out/s2s-$attention --quiet
done
python - <<'PY'
import json, pathlib
rows = []
for task, key in [("clm", "validation_perplexity"), ("mlm", "validation_perplexity"), ("cls", "test_accuracy"),
                  ("cls", "test_f1"), ("s2s", "test_bleu"), ("s2s", "test_chrf")]:
    values = {a: json.loads(pathlib.Path(f"outputs/compare/{task}-{a}/metrics.json").read_text())[key] for a in ("favor", "softmax")}
    rows.append(f"| {task} | {key} | {values['favor']:.3f} | {values['softmax']:.3f} |")
print("| task | metric | FAVOR+ | softmax |\n|---|---|---|---|\n" + "\n".join(rows))
PY
