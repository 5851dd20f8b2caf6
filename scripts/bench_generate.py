#!/usr/bin/env python
"""Per-token decoding latency and cache size against context length: a FAVOR+ Performer LM
(recurrent state) vs transformers' GPT-2 of the same shape (SDPA, growing KV cache), both with
random weights, measured in the same run. Each (model, context) point runs in a fresh process so
that one point's large allocations do not slow the next.
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_generate.py."""

from modeling_performer.recipes.commands.bench_generate import main

if __name__ == "__main__":
    main()
