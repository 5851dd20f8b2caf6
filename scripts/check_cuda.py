#!/usr/bin/env python
"""CUDA checks: kernel equivalence on the GPU (FAVOR+, Hedgehog maps, the local window), mixed
precision, cached generation, and speed / peak memory against SDPA (forward+backward, B=1, H=8,
D=64, FAVOR+ M=256, Hedgehog F=64, window W=64).
`--help` gives the options; the tool is modeling_performer/recipes/commands/check_cuda.py."""

from modeling_performer.recipes.commands.check_cuda import main

if __name__ == "__main__":
    main()
