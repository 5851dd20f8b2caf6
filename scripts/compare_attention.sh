#!/usr/bin/env bash
# Linear attention against the same models with exact softmax attention, same budget and seed
# (README "Results"). Each language model is trained four times: softmax, FAVOR+, Hedgehog maps,
# Hedgehog maps + an exact window of 64 tokens, at SEQ_LEN tokens of context (default 1024, so the
# window sees a small part of it). Writes outputs/compare/<task>-<variant>/metrics.json, prints the
# table and writes it to outputs/bench/compare_attention_<SEQ_LEN>.json (UPDATE_FIGURES=1: the
# committed docs/figures/compare_attention_<SEQ_LEN>.json), with date and commit.
#   TASKS="clm mlm"        which tasks (clm, mlm, cls = Rotten Tomatoes on the MLM encoder, s2s)
#   STEPS_SCALE=2          doubles every budget;  SEQ_LEN=128 for the short-context setting
# The seq2seq task needs Debian's sword packages (apt); where they cannot be fetched it is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
TASKS=${TASKS:-clm mlm}
s=${STEPS_SCALE:-1}
seq_len=${SEQ_LEN:-1024}
# Same tokens per step at every context length: 16 x 128 = 2 x 1024.
batch=$(( 2048 / seq_len > 0 ? 2048 / seq_len : 1 ))
out=outputs/compare
python scripts/prepare_data.py --datasets text
case " $TASKS " in *" cls "*) python scripts/prepare_data.py --datasets rotten_tomatoes ;; esac
if [[ " $TASKS " == *" s2s "* ]]; then
    if python scripts/prepare_data.py --datasets bible; then
        [ -f data_cache/bible/tokenizer/tokenizer.json ] || python scripts/train_tokenizer.py \
            --corpus data_cache/bible/train.jsonl --fields en es --output data_cache/bible/tokenizer
    else
        echo "bible corpus unavailable here (apt): skipping the s2s task" >&2
        TASKS=${TASKS//s2s/}
    fi
fi

declare -A VARIANT=(
    [softmax]="--attention-type softmax --local-window 0"
    [favor]="--attention-type favor --feature-map softmax --local-window 0"
    [hedgehog]="--attention-type favor --feature-map hedgehog --local-window 0"
    [hedgehog-w64]="--attention-type favor --feature-map hedgehog --local-window 64"
)
for variant in softmax favor hedgehog hedgehog-w64; do
    options=${VARIANT[$variant]}
    for task in $TASKS; do
        case $task in
        clm|mlm)
            # shellcheck disable=SC2086
            python scripts/train.py --task $task $options --max-steps $((400 * s)) --eval-steps 200 \
                --batch-size $batch --seq-len $seq_len --learning-rate 2e-3 --output $out/$task-$variant --quiet ;;
        cls)
            python scripts/train.py --task classification --init $out/mlm-$variant --max-steps $((300 * s)) \
                --eval-steps 150 --batch-size 32 --seq-len 128 --learning-rate 5e-4 --output $out/cls-$variant --quiet ;;
        s2s)
            # shellcheck disable=SC2086
            python scripts/train.py --task seq2seq $options --tokenizer data_cache/bible/tokenizer \
                --max-steps $((600 * s)) --eval-steps 300 --batch-size 16 --seq-len 64 --learning-rate 2e-3 \
                --bleu-rows 300 --output $out/s2s-$variant --quiet ;;
        esac
    done
done
TASKS="$TASKS" SEQ_LEN=$seq_len STEPS_SCALE=$s python - <<'PY'
import json, os, pathlib, sys
sys.path.insert(0, "scripts")
from bench_common import FIGURES, RESULTS, provenance
keys = {"clm": ["validation_perplexity"], "mlm": ["validation_perplexity"], "cls": ["test_accuracy", "test_f1"],
        "s2s": ["test_bleu", "test_chrf"]}
variants = ["softmax", "favor", "hedgehog", "hedgehog-w64"]
results = {}
print("| task | metric | " + " | ".join(variants) + " |\n|---|---|" + "---|" * len(variants))
for task in os.environ["TASKS"].split():
    for key in keys[task]:
        values = [json.loads(pathlib.Path(f"outputs/compare/{task}-{v}/metrics.json").read_text())[key] for v in variants]
        results.setdefault(task, {})[key] = dict(zip(variants, values))
        print(f"| {task} | {key} | " + " | ".join(f"{x:.3f}" for x in values) + " |")
record = {"seq_len": int(os.environ["SEQ_LEN"]), "steps_scale": int(os.environ["STEPS_SCALE"]), **provenance(),
          "results": results}
path = (FIGURES if os.environ.get("UPDATE_FIGURES") == "1" else RESULTS) / f"compare_attention_{os.environ['SEQ_LEN']}.json"
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(record, indent=2))
print(f"wrote {path}")
PY
