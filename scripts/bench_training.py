#!/usr/bin/env python
"""Full-model training throughput against context length: tokens/s and peak memory of one
forward+backward of a causal LM (batch 1, loss on every token), for the Performer stack with
FAVOR+, with Hedgehog maps and an exact local window, the same stack with exact softmax (SDPA),
and transformers' GPT-2 of the same shape. Random weights; each point in a fresh process (one
warm-up step, then the median of the timed ones).
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_training.py."""

from modeling_performer.recipes.commands.bench_training import main

if __name__ == "__main__":
    main()
