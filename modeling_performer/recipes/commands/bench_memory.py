"""Resident memory across repeated generate() calls: a leak (caches kept alive, growing
buffers, per-call registrations) shows as RSS and Python-heap growth per call after warm-up.

    python scripts/bench_memory.py --calls 60

Prints, per decoding mode, RSS after warm-up, after all calls, the growth per call and the ratio
of final to warm-up RSS (1.00 = no growth), plus the Python heap growth (tracemalloc); writes them
to outputs/bench/memory.json (--update-figures: the committed docs/figures/memory.json).
"""

import argparse
import gc
import json
import os
import tracemalloc

import torch

from modeling_performer.recipes.bench_common import add_output_arguments, provenance, results_path


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    add_output_arguments(parser, "memory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from modeling_performer import PerformerConfig, PerformerForCausalLM

    config = PerformerConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=1024, num_random_features=128, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    model = PerformerForCausalLM(config).eval()
    prompts = torch.randint(5, 8000, (2, 32))
    modes = {"greedy": dict(do_sample=False), "sampling": dict(do_sample=True, top_k=40),
             "beam-3": dict(do_sample=False, num_beams=3)}
    results = {}
    for name, options in modes.items():
        def call():
            with torch.no_grad():
                model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, **options)
        for _ in range(args.warmup):
            call()
        gc.collect()
        tracemalloc.start()
        start_rss, start_heap = rss_mib(), tracemalloc.get_traced_memory()[0]
        for _ in range(args.calls):
            call()
        gc.collect()
        end_rss, end_heap = rss_mib(), tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        results[name] = {
            "rss_after_warmup_mib": round(start_rss, 1), "rss_after_calls_mib": round(end_rss, 1),
            "rss_growth_per_call_kib": round((end_rss - start_rss) * 1024 / args.calls, 1),
            "rss_ratio": round(end_rss / start_rss, 3),
            "python_heap_growth_per_call_kib": round((end_heap - start_heap) / 1024 / args.calls, 2),
        }
        print(name, json.dumps(results[name]))
    record = {"calls": args.calls, "warmup": args.warmup, "new_tokens": args.new_tokens, "threads": args.threads,
              **provenance(), "results": results}
    path = results_path(args, "memory")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
