#!/usr/bin/env python
"""Redraws the benchmark figures in docs/figures from the results files beside them.
`--help` gives the options; the tool is modeling_performer/recipes/plots.py."""

from modeling_performer.recipes.plots import main

if __name__ == "__main__":
    main()
