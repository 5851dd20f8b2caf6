#!/usr/bin/env python
"""Prints the parameter count of every preset in configuration/presets (or of given files).
`--help` gives the options; the tool is modeling_performer/recipes/commands/count_parameters.py."""

from modeling_performer.recipes.commands.count_parameters import main

if __name__ == "__main__":
    main()
