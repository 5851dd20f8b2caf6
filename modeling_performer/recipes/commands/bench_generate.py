"""Per-token decoding latency and cache size against context length: a FAVOR+ Performer LM
(recurrent state) vs transformers' GPT-2 of the same shape (SDPA, growing KV cache), both with
random weights, measured in the same run. Each (model, context) point runs in a fresh process so
that one point's large allocations do not slow the next.

    python scripts/bench_generate.py                       # contexts 128, 1k, 4k, 8k
    python scripts/bench_generate.py --contexts 128 2048 --steps 8
"""

import argparse
import json
import statistics
import sys
import time

from modeling_performer.cache_performer import cache_bytes
from modeling_performer.recipes.bench_common import add_output_arguments, measure_in_process, save_and_draw


def decode_latency(model, context, steps, vocab):
    import torch

    ids = torch.randint(3, vocab, (1, context))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return statistics.median(times), cache_bytes(cache)


def build(kind, args, longest):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling_performer import PerformerConfig, PerformerForCausalLM

    torch.manual_seed(0)
    if kind == "performer":
        return PerformerForCausalLM(PerformerConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, intermediate_size=4 * args.hidden, num_random_features=args.features,
            attention_type="favor", max_position_embeddings=longest,
        )).eval()
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads, n_positions=longest,
        attn_implementation="sdpa", bos_token_id=0, eos_token_id=0,
    )).eval()


def worker(args):
    import torch

    if args.flush_denormal:
        torch.set_flush_denormal(True)
    kind, context = args.worker[0], int(args.worker[1])
    model = build(kind, args, max(args.contexts) + args.steps + 1)
    seconds, size = decode_latency(model, context, args.steps, args.vocab)
    print(json.dumps({"seconds": seconds, "bytes": size, "threads": torch.get_num_threads()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=32, help="decoded tokens timed per context (median)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh processes per point, interleaved across contexts (median of their medians)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True) in the measuring processes")
    add_output_arguments(parser, "decoding")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, FAVOR+ M={args.features}; "
          f"median of {args.steps} decoded tokens after a prefill of the context, median of {args.repeats} processes")
    print(f"{'context':>8} {'performer ms/token':>19} {'gpt2 ms/token':>14} {'gpt2/performer':>15} "
          f"{'performer cache':>16} {'gpt2 cache':>12}")
    runs = {}
    for _ in range(args.repeats):  # interleaved: slow phases of a noisy machine hit every point alike
        for context in args.contexts:
            for kind in ("performer", "gpt2"):
                runs.setdefault((kind, context), []).append(measure_in_process(sys.argv[0], (kind, context), abort_on_error=True))
    rows, saved = [], []
    for context in args.contexts:
        ours = statistics.median(r["seconds"] for r in runs["performer", context])
        theirs = statistics.median(r["seconds"] for r in runs["gpt2", context])
        ours_bytes, theirs_bytes = runs["performer", context][0]["bytes"], runs["gpt2", context][0]["bytes"]
        rows.append((context, ours, theirs))
        saved.append({"context": context, "performer_ms": ours * 1e3, "gpt2_ms": theirs * 1e3,
                      "performer_cache_mib": ours_bytes / 2**20, "gpt2_cache_mib": theirs_bytes / 2**20})
        print(f"{context:>8} {ours * 1e3:>19.2f} {theirs * 1e3:>14.2f} {theirs / ours:>15.2f} "
              f"{ours_bytes / 2**20:>12.2f} MiB {theirs_bytes / 2**20:>8.1f} MiB", flush=True)
    first, last = rows[0], rows[-1]
    print(f"performer latency at {last[0]} / at {first[0]}: x{last[1] / first[1]:.2f}")
    faster = [c for c, ours, theirs in rows if ours < theirs]
    print(f"performer faster per token than GPT-2 from context {min(faster) if faster else 'never (in this range)'}")
    save_and_draw("decoding", args, {"rows": saved})


if __name__ == "__main__":
    main()
