#!/usr/bin/env python
"""Writes the Hub model card (README.md) of a folder that scripts/train.py saved.
`--help` gives the options; the tool is modeling_performer/recipes/model_card.py."""

from modeling_performer.recipes.model_card import main

if __name__ == "__main__":
    main()
