#!/usr/bin/env python
"""Perplexity of causal LMs on the held-out validation plays at several context lengths, and the
memory their decoding cache holds after a prompt of N tokens.
`--help` gives the options; the tool is modeling_performer/recipes/commands/evaluate_lm.py."""

from modeling_performer.recipes.commands.evaluate_lm import main

if __name__ == "__main__":
    main()
