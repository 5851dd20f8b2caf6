"""Perplexity of causal LMs on the held-out validation plays at several context lengths, and the
memory their decoding cache holds after a prompt of N tokens.

    python scripts/evaluate_lm.py outputs/recipe/clm-teacher outputs/recipe/clm-linear \\
        --seq-len 512 2048 --cache-tokens 2048 8192 --output outputs/recipe/clm-eval.json

Perplexity: the validation text is tokenised as scripts/train.py does (BOS + play + EOS, joined) and
cut into whole blocks of L tokens; every block is scored on its own (the first token of a block has
no context), so the numbers equal train.py's `validation_perplexity` at --seq-len L; with
--position-edges (default 512 2048) the perplexity of the predictions at positions [0, 512),
[512, 2048), ... of the blocks is reported too: where a long block is worse than a short one. Cache: one
prompt of N tokens (taken from the validation text, repeated when shorter) is prefilled in chunks
of 1,024 and one token decoded; the size of every tensor the cache then holds is reported (MiB).
A model folder already in --output is not evaluated again.
"""

import argparse
import contextlib
import json
import math
import pathlib

from modeling_performer.recipes import ROOT  # the repository the command runs in
from modeling_performer.recipes import devices
from modeling_performer.recipes.devices import add_device_arguments
from modeling_performer.recipes.training_data import joined_ids


def validation_ids(tokenizer, path):
    return joined_ids(tokenizer, [json.loads(line)["text"] for line in open(path) if line.strip()])


def perplexity(model, ids, seq_len, tokens_per_batch=8192, position_edges=(), autocast=None):
    """-> (perplexity over every predicted token of the blocks, number of blocks, {"a-b": perplexity of
    the predictions made at positions a..b-1 of a block} for the edges inside the block)."""
    import torch

    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    if len(blocks) == 0:
        raise SystemExit(f"the validation text has {len(ids)} tokens: not one block of {seq_len}")
    from tqdm.auto import tqdm

    batch = max(1, tokens_per_batch // seq_len)
    per_position = torch.zeros(seq_len - 1, dtype=torch.float64)  # summed loss of the prediction made at position t
    autocast = autocast or contextlib.nullcontext
    with torch.inference_mode():
        for rows in tqdm(blocks.split(batch), desc=f"perplexity at {seq_len}", leave=False):
            rows = rows.to(model.device)
            with autocast():
                logits = model(input_ids=rows).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
            per_position += loss.double().sum(0).cpu()
    edges = [0, *[e for e in position_edges if 0 < e < seq_len - 1], seq_len - 1]
    spans = {f"{a}-{b}": math.exp(per_position[a:b].sum().item() / ((b - a) * len(blocks)))
             for a, b in zip(edges, edges[1:])} if len(edges) > 2 else {}
    return math.exp(per_position.sum().item() / per_position.numel() / len(blocks)), len(blocks), spans


def cache_mib(model, ids, tokens):
    import torch

    prompt = torch.tensor((ids * (tokens // max(len(ids), 1) + 1))[:tokens])[None].to(model.device)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False, use_cache=True,
                             prefill_chunk_size=1024, return_dict_in_generate=True, pad_token_id=0)
    from modeling_performer.cache_performer import cache_bytes

    return cache_bytes(out.cache) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="causal LM folders (one tokenizer: the first model's)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[512])
    parser.add_argument("--cache-tokens", type=int, nargs="*", default=[])
    parser.add_argument("--position-edges", type=int, nargs="*", default=[512, 2048],
                        help="also report perplexity by position within the blocks, split at these positions")
    parser.add_argument("--data", default=str(ROOT / "data_cache" / "text" / "validation.jsonl"))
    parser.add_argument("--output", help="JSON file: results per model folder (kept and extended between runs)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device, precision = devices.setup(args)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_performer  # noqa: F401  (registers the Performer Auto classes)

    torch.manual_seed(0)
    output = pathlib.Path(args.output) if args.output else None
    results = json.loads(output.read_text()) if output and output.exists() else {}
    tokenizer = AutoTokenizer.from_pretrained(args.models[0])
    ids = validation_ids(tokenizer, args.data)
    for folder in args.models:
        if folder in results:
            print(folder, json.dumps(results[folder]), "(already evaluated)")
            continue
        model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
        row = {}
        for seq_len in args.seq_len:
            row[f"perplexity_{seq_len}"], row[f"blocks_{seq_len}"], spans = perplexity(
                model, ids, seq_len, position_edges=args.position_edges,
                autocast=lambda: devices.autocast(device, precision))
            row.update({f"perplexity_{seq_len}_positions_{span}": value for span, value in spans.items()})
        for tokens in args.cache_tokens:
            row[f"cache_mib_{tokens}"] = round(cache_mib(model, ids, tokens), 3)
        results[folder] = row
        print(folder, json.dumps(row), flush=True)
        if output:
            tmp = output.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2))
            tmp.replace(output)
    return results


if __name__ == "__main__":
    main()
