#!/usr/bin/env python
"""How long the recipe's causal-LM steps take for a 1B Llama, estimated from shallower copies.
`--help` gives the options; the tool is modeling_performer/recipes/commands/estimate_recipe_time.py."""

from modeling_performer.recipes.commands.estimate_recipe_time import main

if __name__ == "__main__":
    main()
