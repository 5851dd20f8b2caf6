#!/usr/bin/env python
"""Trains a Performer on the bundled corpora or your data (clm, mlm, classification, seq2seq;
Trainer, or FSDP2 under torchrun with --fsdp).
`--help` gives the options; the tool is modeling_performer/recipes/commands/train.py
(options and the Trainer path: training.py)."""

from modeling_performer.recipes.commands.train import main

if __name__ == "__main__":
    main()
