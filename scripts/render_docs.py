#!/usr/bin/env python
"""Renders the tables of the README and the documentation from the results files in docs/figures,
and checks every number the pages quote against those files (`--check`: write nothing).
`--help` gives the options; the tool is modeling_performer/recipes/docs_numbers.py."""

from modeling_performer.recipes.docs_numbers import main

if __name__ == "__main__":
    main()
