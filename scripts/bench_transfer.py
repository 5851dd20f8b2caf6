#!/usr/bin/env python
"""Fitting throughput of attention transfer with the teacher run in every step, against the
teacher computed once and read back (transfer.TeacherCache), the variants timed in turn in this
process (modeling_performer.recipes.transfer_timing).
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_transfer.py."""

from modeling_performer.recipes.commands.bench_transfer import main

if __name__ == "__main__":
    main()
