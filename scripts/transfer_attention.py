#!/usr/bin/env python
"""Attention transfer: fits the linear attention of STUDENT (its feature maps and window weights,
nothing else) so that every layer reproduces the softmax attention output of TEACHER on its own
layer inputs, and writes the result to OUTPUT (loads with AutoModel* like STUDENT).
`--help` gives the options; the tool is modeling_performer/recipes/commands/transfer_attention.py."""

from modeling_performer.recipes.commands.transfer_attention import main

if __name__ == "__main__":
    main()
