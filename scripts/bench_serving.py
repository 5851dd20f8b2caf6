#!/usr/bin/env python
"""Batched generation: decoding throughput (tokens/s) and peak memory when serving many long
prompts at once. A Performer causal LM (FAVOR+, and Hedgehog maps with an exact local window)
against transformers' GPT-2 of the same shape (SDPA, KV cache: transformers' default dynamic one,
or its static one), random weights, in the same run. Every batch holds prompts of different
lengths (uniform in [context/2, context], left-padded to `context`), generated with `generate()`
(greedy), eager or with compiled decoding steps. Each point runs in a fresh
process; decoding time is taken between generation steps (a logits processor stamps each step),
so the prefill is reported apart.
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_serving.py."""

from modeling_performer.recipes.commands.bench_serving import main

if __name__ == "__main__":
    main()
