#!/usr/bin/env python
"""Prints the results tables of scripts/convert_recipe.sh (markdown) from its output folder, and
writes them to FOLDER/results.md, with every number behind them in FOLDER/results.json (the
measurements, the minutes, the date and the commit). Cells of steps that have not run yet are left
empty.
`--help` gives the options; the tool is modeling_performer/recipes/commands/recipe_report.py."""

from modeling_performer.recipes.commands.recipe_report import main

if __name__ == "__main__":
    main()
