#!/usr/bin/env python
"""Resident memory across repeated generate() calls: a leak (caches kept alive, growing
buffers, per-call registrations) shows as RSS and Python-heap growth per call after warm-up.
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_memory.py."""

from modeling_performer.recipes.commands.bench_memory import main

if __name__ == "__main__":
    main()
