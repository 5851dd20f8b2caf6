#!/usr/bin/env python
"""How well does each linear attention approximate softmax? Relative error of the attention
output, ||approx - exact|| / ||exact||, beside the trivial estimate that ignores q and k and
returns the mean of V, on
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_approximation.py."""

from modeling_performer.recipes.commands.bench_approximation import main

if __name__ == "__main__":
    main()
