"""Batched generation: decoding throughput (tokens/s) and peak memory when serving many long
prompts at once. A Performer causal LM (FAVOR+, and Hedgehog maps with an exact local window)
against transformers' GPT-2 of the same shape (SDPA, KV cache: transformers' default dynamic one,
or its static one), random weights, in the same run. Every batch holds prompts of different
lengths (uniform in [context/2, context], left-padded to `context`), generated with `generate()`
(greedy), eager or with compiled decoding steps. Each point runs in a fresh
process; decoding time is taken between generation steps (a logits processor stamps each step),
so the prefill is reported apart.

    python scripts/bench_serving.py                          # batch 1 8 32, contexts 1k 8k
    python scripts/bench_serving.py --batches 8 --contexts 4096 --new-tokens 16
    python scripts/bench_serving.py --contexts 4096 8192 --repeats 3   # median of 3 interleaved runs
    python scripts/bench_serving.py --batches 8 --contexts 4096 --compile   # compiled steps, GPT-2 static cache
    python scripts/bench_serving.py --replot                 # redraw the figure from the saved JSON

Writes outputs/bench/serving.json and .png; --update-figures writes the committed docs/figures/serving.*.
"""

import argparse
import json
import resource
import sys
import time

from modeling_performer.cache_performer import cache_bytes
from modeling_performer.recipes.bench_common import (
    add_model_arguments, handled_without_measuring, measure_in_process, save_and_draw,
)

KINDS = ("performer", "performer-window", "gpt2")


def build(kind, args, longest):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling_performer import PerformerConfig, PerformerForCausalLM

    torch.manual_seed(0)
    if kind.startswith("performer"):
        extra = {"feature_map": "hedgehog", "local_window": args.window} if kind == "performer-window" else {}
        return PerformerForCausalLM(PerformerConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, intermediate_size=4 * args.hidden, num_random_features=args.features,
            attention_type="favor", max_position_embeddings=longest, hidden_dropout_prob=0.0, **extra,
        )).eval()
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads, n_positions=longest,
        attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )).eval()


def worker(args):
    import torch
    from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList

    kind, batch, context = args.worker[0], int(args.worker[1]), int(args.worker[2])
    model = build(kind, args, context + args.new_tokens + 1)
    g = torch.Generator().manual_seed(batch * 7919 + context)
    lengths = torch.randint(context // 2, context + 1, (batch,), generator=g)
    lengths[0] = context
    ids = torch.randint(3, args.vocab, (batch, context), generator=g)
    mask = (torch.arange(context)[None] >= (context - lengths)[:, None]).long()  # left padding
    ids = ids.masked_fill(mask == 0, 0)

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    options, cache_kind = {}, "performer" if kind.startswith("performer") else args.gpt2_cache
    if args.compile:
        # generate() compiles the decoding step (the prefill stays eager) for caches of constant shape:
        # ours, and transformers' static cache for GPT-2. On CPU transformers compiles only when asked.
        compile_config = CompileConfig(fullgraph=True)
        compile_config._compile_all_devices = True
        options["compile_config"] = compile_config
        cache_kind = "performer" if kind.startswith("performer") else "static"
    if cache_kind == "static":
        options["cache_implementation"] = "static"
    torch._dynamo.utils.counters.clear()
    stamp = Stamp()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, logits_processor=LogitsProcessorList([stamp]), pad_token_id=0,
                             return_dict_in_generate=True, prefill_chunk_size=args.prefill_chunk or None, **options)
    prefill = stamp.times[0] - start
    # The first steps of a compiled run compile (and recompile once the growing mask turns dynamic).
    first = args.warmup_steps if args.warmup_steps is not None else (3 if args.compile else 0)
    steps = len(stamp.times) - 1 - first
    if steps < 1:
        raise SystemExit(f"--new-tokens {args.new_tokens} leaves no timed step after {first} warm-up steps")
    decode = stamp.times[-1] - stamp.times[first]
    cache = out.cache
    print(json.dumps({
        "kind": kind, "batch": batch, "context": context, "prefill_s": prefill,
        "decode_tokens_per_s": batch * steps / decode, "ms_per_step": 1e3 * decode / steps, "timed_steps": steps,
        "compiled": bool(args.compile), "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "cache_implementation": cache_kind,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cache_mib": cache_bytes(cache) / 2**20 if cache is not None else None,
        "threads": torch.get_num_threads(),
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=1024,
                        help="prompts are prefilled this many tokens at a time (generate's prefill_chunk_size; 0 = "
                             "all at once): bounds prefill memory at batch 32 x 8k")
    parser.add_argument("--compile", action="store_true",
                        help="compile every model's decoding step (generate's compile_config; GPT-2 then uses "
                             "transformers' static cache, the one it can compile)")
    parser.add_argument("--gpt2-cache", choices=["dynamic", "static"], default="dynamic",
                        help="GPT-2's KV cache when not compiling: transformers' default (dynamic, grown by "
                             "concatenation every step) or static (preallocated for the whole generation)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="decoding steps left out of the timing (default: 3 with --compile, else 0)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh processes per point, in interleaved rounds; the median run is reported")
    add_model_arguments(parser, "serving", worker_args=3)
    args = parser.parse_args()
    if args.repeats < 1 or (args.warmup_steps is not None and args.warmup_steps < 0):
        parser.error(f"--repeats must be >= 1 and --warmup-steps >= 0, got {args.repeats} and {args.warmup_steps}")
    if handled_without_measuring("serving", args, worker):
        return
    print(f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, M={args.features}, window {args.window}; "
          f"{args.new_tokens} new tokens per prompt, prompts of context/2..context tokens, left-padded; "
          f"median of {args.repeats} run(s) per point; "
          f"{'compiled decoding steps, GPT-2 with a static cache' if args.compile else f'eager, GPT-2 with a {args.gpt2_cache} cache'}")
    print(f"{'context':>7} {'batch':>5} {'model':>17} {'tokens/s':>9} {'ms/step':>8} {'prefill s':>9} "
          f"{'cache MiB':>9} {'peak RSS MiB':>12}")
    results = []
    for context in args.contexts:
        for batch in args.batches:
            runs = {kind: [] for kind in args.kinds}
            for _ in range(args.repeats):  # rounds interleave the models: machine noise hits all alike
                for kind in args.kinds:
                    r = measure_in_process(sys.argv[0], (kind, batch, context))
                    if "error" in r:
                        print(f"{context:>7} {batch:>5} {kind:>17} failed: {r['error']}", flush=True)
                    else:
                        runs[kind].append(r)
            row = {}
            for kind, done in runs.items():
                if not done:
                    continue
                # The run with the median throughput stands for the point; every run's figure is kept.
                r = sorted(done, key=lambda run: run["decode_tokens_per_s"])[(len(done) - 1) // 2]
                r["runs_tokens_per_s"] = [run["decode_tokens_per_s"] for run in done]
                results.append(r)
                row[kind] = r
                print(f"{context:>7} {batch:>5} {kind:>17} {r['decode_tokens_per_s']:>9.1f} {r['ms_per_step']:>8.1f} "
                      f"{r['prefill_s']:>9.2f} {r['cache_mib']:>9.2f} {r['peak_rss_mib']:>12.0f}", flush=True)
            if "gpt2" in row:
                for kind in ("performer", "performer-window"):
                    if kind in row:
                        print(f"{'':>7} {'':>5} {kind:>17} throughput x{row[kind]['decode_tokens_per_s'] / row['gpt2']['decode_tokens_per_s']:.2f} "
                              f"of GPT-2's, cache 1/{row['gpt2']['cache_mib'] / row[kind]['cache_mib']:.0f}", flush=True)
    save_and_draw("serving", args, {"results": results})


if __name__ == "__main__":
    main()
