"""Full-model training throughput against context length: tokens/s and peak memory of one
forward+backward of a causal LM (batch 1, loss on every token), for the Performer stack with
FAVOR+, with Hedgehog maps and an exact local window, the same stack with exact softmax (SDPA),
and transformers' GPT-2 of the same shape. Random weights; each point in a fresh process (one
warm-up step, then the median of the timed ones).

    python scripts/bench_training.py                            # T = 512 ... 32k
    python scripts/bench_training.py --lengths 512 8192 --repeats 1
    python scripts/bench_training.py --replot

Writes outputs/bench/training.json and .png; --update-figures writes the committed docs/figures/training.*.
"""

import argparse
import json
import resource
import statistics
import sys
import time

from modeling_performer.recipes.bench_common import (
    add_model_arguments, handled_without_measuring, measure_in_process, save_and_draw,
)

KINDS = ("performer", "performer-window", "softmax", "gpt2")


def build(kind, args, length):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling_performer import PerformerConfig, PerformerForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads, n_positions=length,
            attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        ))
    extra = {"feature_map": "hedgehog", "local_window": args.window} if kind == "performer-window" else {}
    return PerformerForCausalLM(PerformerConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, num_random_features=args.features, max_position_embeddings=length,
        attention_type="softmax" if kind == "softmax" else "favor", hidden_dropout_prob=0.0, use_cache=False,
        chunk_size=args.chunk_size, **extra,
    ))


def worker(args):
    import torch

    kind, length = args.worker[0], int(args.worker[1])
    model = build(kind, args, length).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.randint(3, args.vocab, (1, length), generator=torch.Generator().manual_seed(length))
    times = []
    for step in range(args.repeats + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(json.dumps({"kind": kind, "length": length, "seconds": seconds, "tokens_per_s": length / seconds,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "threads": torch.get_num_threads()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--softmax-max", type=int, default=16384,
                        help="longest T for the quadratic models (softmax, GPT-2): their time grows as T^2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each layer in the backward pass (activations of one layer at a time)")
    parser.add_argument("--chunk-size", type=int, default=128)
    add_model_arguments(parser, "training", worker_args=2)
    args = parser.parse_args()
    if handled_without_measuring("training", args, worker):
        return
    print(f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, M={args.features}, window {args.window}; "
          f"batch 1, forward + backward, median of {args.repeats} after a warm-up")
    print(f"{'T':>6} {'model':>17} {'tokens/s':>9} {'s/step':>7} {'peak RSS MiB':>12}")
    results = []
    for length in args.lengths:
        for kind in args.kinds:
            if kind in ("softmax", "gpt2") and length > args.softmax_max:
                print(f"{length:>6} {kind:>17} skipped (T > --softmax-max {args.softmax_max})", flush=True)
                continue
            r = measure_in_process(sys.argv[0], (kind, length))
            if "error" in r:
                print(f"{length:>6} {kind:>17} failed: {r['error']}", flush=True)
                continue
            results.append(r)
            print(f"{length:>6} {kind:>17} {r['tokens_per_s']:>9.0f} {r['seconds']:>7.2f} {r['peak_rss_mib']:>12.0f}",
                  flush=True)
    by = {(r["kind"], r["length"]): r for r in results}
    for length in args.lengths:
        if ("performer", length) in by and ("softmax", length) in by:
            print(f"T={length}: FAVOR+ x{by['performer', length]['tokens_per_s'] / by['softmax', length]['tokens_per_s']:.2f} "
                  f"of softmax's tokens/s")
    ours = sorted((r for r in results if r["kind"] == "performer"), key=lambda r: r["length"])
    if len(ours) > 1:
        print(f"FAVOR+ tokens/s at T={ours[-1]['length']} / at T={ours[0]['length']}: "
              f"x{ours[-1]['tokens_per_s'] / ours[0]['tokens_per_s']:.2f}")
    save_and_draw("training", args, {"results": results})


if __name__ == "__main__":
    main()
