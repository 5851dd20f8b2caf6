#!/usr/bin/env python
"""How much of a softmax encoder's attention goes to keys outside a local window, and how much of
that to the first token ([CLS]): the weight that `--local-window W` leaves to the linear part, and
the share that `--sink-tokens 1` keeps exact. Per layer and head, averaged over the queries at
distance >= W from the key (for [CLS]: positions W and beyond) on passages of --passage-tokens
tokens of --data (special tokens included, as embedding_similarity.py cuts them).
`--help` gives the options; the tool is modeling_performer/recipes/commands/attention_sinks.py."""

from modeling_performer.recipes.commands.attention_sinks import main

if __name__ == "__main__":
    main()
