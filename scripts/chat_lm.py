#!/usr/bin/env python
"""The chat-lm recipe's own steps (scripts/convert_recipe.sh chat-lm runs them in order):
`--help` gives the options; the tool is modeling_performer/recipes/commands/chat_lm.py."""

from modeling_performer.recipes.commands.chat_lm import main

if __name__ == "__main__":
    main()
