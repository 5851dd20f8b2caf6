#!/usr/bin/env python
"""One GPU run, about 5 minutes: the fast path checked against the PyTorch path, then timed.
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_gpu.py."""

from modeling_performer.recipes.commands.bench_gpu import main

if __name__ == "__main__":
    main()
