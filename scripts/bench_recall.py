#!/usr/bin/env python
"""Multi-query associative recall (MQAR; "Zoology", Arora et al. 2023): which attention can look
up a value by its key, trained from scratch on the sequences modeling_performer.recipes.recall
generates (the task and the curriculum are described there).
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_recall.py."""

from modeling_performer.recipes.commands.bench_recall import main

if __name__ == "__main__":
    main()
