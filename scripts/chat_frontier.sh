#!/usr/bin/env bash
# The SmolLM2 quality/cost frontier: the chat-lm recipe (scripts/convert_recipe.sh chat-lm) once per
# configuration, every row on the same teacher, the same fitting rows and the same layer ranking, then
# the table (docs/figures/smollm2/frontier.json, `chat_lm.py frontier`).
#
#   bash scripts/chat_frontier.sh top3 uniform3        # rows by name; no names: every row below
#
# Rows: maps-w64 (the maps and window weights only, sparse cache 64), lora (the same + LoRA rank 8
# on q/k/v/o), top1..top4 (the K layers rank-layers measures keep softmax, LoRA 8, no sparse cache),
# uniform1..uniform4 (K evenly spaced layers, otherwise the same), w256 (maps only, window 256),
# decay (maps only, the data-dependent decay gate).
# FRONTIER_SCALE (default 0.5) scales every fitting budget (1 = the recipe's); FRONTIER_EVALUATION=full
# scores as the recipe does, screening (the default) at 512 / 2,048 tokens, documents of 300 / 1,000 /
# 2,000 tokens and the short chat. FRONTIER_TEACHER_CACHE=1 has every row read the teacher's layer
# states and top-64 next-token distributions from one store (outputs/frontier/shared/teacher-cache)
# instead of running the teacher in each fitting step. After the rows, their students' batch-1 decoding
# at 8,192 tokens is timed against the teacher's in one process (FRONTIER_DECODE=0: not). A killed run
# resumes with the same command. Outputs: outputs/frontier/ROW/ (FRONTIER_OUT), each with its results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
root=${FRONTIER_OUT:-outputs/frontier}
shared=$root/shared
scale=${FRONTIER_SCALE:-0.5}
rows=${*:-maps-w64 lora top1 top2 top3 top4 uniform1 uniform2 uniform3 uniform4 w256 decay}
source_model=${CHAT_SOURCE:-data_cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}

screening=(--parts language documents chat --ppl-lengths 512 2048 8192 --ppl-tokens 4096
           --document-lengths 300 1000 2000 --per-length 12)
[ "${FRONTIER_EVALUATION:-screening}" = full ] && screening=()

# What every row shares: the teacher, the teacher's transcripts and plain rows, the layer ranking.
mkdir -p $shared
[ -z "${CHAT_SOURCE:-}" ] && python scripts/prepare_data.py --datasets smollm2 > /dev/null
python scripts/prepare_data.py --datasets text bible speeches > /dev/null
# shared_step NAME DONE_FILE COMMAND...: runs COMMAND unless DONE_FILE exists, its minutes into shared/minutes.tsv
# (every row's fitting time counts them: `chat_lm.py frontier`)
shared_step() {
    local name=$1 done_file=$2; shift 2
    [ -e "$done_file" ] && return
    local start=$SECONDS
    "$@"
    awk -v n="$name" -v s=$((SECONDS - start)) 'BEGIN { printf "%s\t%.1f\n", n, s / 60 }' >> $shared/minutes.tsv
}
shared_step convert-teacher $shared/teacher/config.json python scripts/convert_to_performer.py "$source_model" \
    $shared/teacher --attention-type softmax
shared_step chat-data $shared/rows.jsonl python scripts/chat_lm.py data $shared/teacher $shared/rows.jsonl \
    --plain-rows 120 --documents 100 --passkeys 24 --prompts 64 --seq-len 2048 ${CHAT_DEVICE_OPTIONS:-}

row_settings() {  # NAME -> the recipe's variables for that row
    case $1 in
        maps-w64) echo "CHAT_SOFTMAX_LAYERS=none CHAT_LORA_RANK=0 CHAT_SPARSE_CACHE=64" ;;
        lora) echo "CHAT_SOFTMAX_LAYERS=none CHAT_LORA_RANK=8 CHAT_SPARSE_CACHE=64" ;;
        top[1-9]) echo "CHAT_SOFTMAX_LAYERS=top:${1#top} CHAT_LORA_RANK=8 CHAT_SPARSE_CACHE=0" ;;
        uniform[1-9]) echo "CHAT_SOFTMAX_LAYERS=uniform:${1#uniform} CHAT_LORA_RANK=8 CHAT_SPARSE_CACHE=0" ;;
        w256) echo "CHAT_SOFTMAX_LAYERS=none CHAT_LORA_RANK=0 CHAT_WINDOW=256 CHAT_SPARSE_CACHE=64" ;;
        decay) echo "CHAT_SOFTMAX_LAYERS=none CHAT_LORA_RANK=0 CHAT_LINEAR_DECAY=data" ;;
        *) echo "unknown frontier row: $1" >&2; return 1 ;;
    esac
}

for row in $rows; do
    settings=$(row_settings $row)
    out=$root/$row
    mkdir -p $out/chat
    ln -sfn "$(realpath $shared/teacher)" $out/chat/teacher
    ln -sfn "$(realpath $shared/rows.jsonl)" $out/chat/rows.jsonl
    # The teacher's answers on the test questions are the same for every row: scored once, then seeded.
    if [ -e $shared/teacher-parts.json ] && [ ! -e $out/chat/results.json.partial.json ]; then
        cp $shared/teacher-parts.json $out/chat/results.json.partial.json
    fi
    cache=()
    if [ "${FRONTIER_TEACHER_CACHE:-0}" = 1 ]; then cache=(CHAT_TEACHER_CACHE=$shared/teacher-cache); fi
    python - "$out/frontier_row.json" "$scale" "${FRONTIER_EVALUATION:-screening}" "$settings" \
        "${FRONTIER_TEACHER_CACHE:-0}" <<'EOF'
import json, os, sys
from modeling_performer.recipes.chat_lm import write_json
path, scale, evaluation, settings, cache = sys.argv[1:]
row = json.load(open(path)) if os.path.exists(path) else {}  # a decode time measured before stays
row.update(budget=float(scale), evaluation=evaluation, settings=settings, teacher_cache=cache == "1")
write_json(path, row)
EOF
    echo "== frontier row $row: $settings"
    env $settings "${cache[@]}" OUT=$out STEPS_SCALE=$scale CHAT_LAYER_RANKING=$shared/layers.json \
        CHAT_EVALUATE_OPTIONS="${screening[*]} ${CHAT_EVALUATE_OPTIONS:-}" CHAT_RESULTS=$out/results.json \
        bash scripts/convert_recipe.sh chat-lm
    [ -e $shared/teacher-parts.json ] || python -c "
import json, sys
partial = json.load(open('$out/chat/results.json.partial.json'))
json.dump({k: v for k, v in partial.items() if k.endswith('-teacher')}, open('$shared/teacher-parts.json', 'w'))"
done

if [ "${FRONTIER_DECODE:-1}" = 1 ]; then
    students=() into=()
    for row in $rows; do students+=($root/$row/chat/student) into+=($root/$row/frontier_row.json); done
    python scripts/decode_speed.py "$source_model" "${students[@]}" --context 8192 --into "${into[@]}" \
        --output $shared/decode-$(echo $rows | tr ' ' '-').json
fi
