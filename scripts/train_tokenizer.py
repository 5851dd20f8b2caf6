#!/usr/bin/env python
"""Trains a SentencePiece unigram tokenizer and writes it as a tokenizer.json that AutoTokenizer
loads.
`--help` gives the options; the tool is modeling_performer/recipes/tokenizer_training.py."""

from modeling_performer.recipes.tokenizer_training import main

if __name__ == "__main__":
    main()
