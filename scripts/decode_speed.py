#!/usr/bin/env python
"""Batch-1 decoding ms per token of linearized students against their teacher at one context, the
models' steps alternating in this process (modeling_performer.recipes.decode_timing); with
--into, each student folder's row file (a frontier row's frontier_row.json) gets its
{"decode": {"context", "teacher_ms", "student_ms"}}.
`--help` gives the options; the tool is modeling_performer/recipes/commands/decode_speed.py."""

from modeling_performer.recipes.commands.decode_speed import main

if __name__ == "__main__":
    main()
