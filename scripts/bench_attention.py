#!/usr/bin/env python
"""Time and peak memory of attention forward+backward: FAVOR+ (ours) vs torch SDPA vs
performer-pytorch (when installed), B=1, H=8, D=64, M=256, all measured in this run.
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_attention.py."""

from modeling_performer.recipes.commands.bench_attention import main

if __name__ == "__main__":
    main()
