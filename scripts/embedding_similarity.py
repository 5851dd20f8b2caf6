#!/usr/bin/env python
"""Mean-pooled sentence embeddings of one or more models against a reference model: the cosine
similarity per text (1.0 = the same embedding), its mean, 5th percentile and minimum. Used to check
how far a linearized copy drifts from its softmax original.
`--help` gives the options; the tool is modeling_performer/recipes/commands/embedding_similarity.py."""

from modeling_performer.recipes.commands.embedding_similarity import main

if __name__ == "__main__":
    main()
