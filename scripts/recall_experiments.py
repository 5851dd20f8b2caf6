#!/usr/bin/env python
"""Recall experiments beyond the benchmark table (scripts/bench_recall.py), on the tasks of
modeling_performer.recipes.recall:
`--help` gives the options; the tool is modeling_performer/recipes/commands/recall_experiments.py."""

from modeling_performer.recipes.commands.recall_experiments import main

if __name__ == "__main__":
    main()
