#!/usr/bin/env python
"""Loads a saved Performer LM with the Auto classes and generates with pipeline("text-generation").
`--help` gives the options; the tool is modeling_performer/recipes/commands/generate.py."""

from modeling_performer.recipes.commands.generate import main

if __name__ == "__main__":
    main()
