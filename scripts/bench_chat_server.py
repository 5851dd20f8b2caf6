#!/usr/bin/env python
"""Chat models behind transformers' own server (`python -m modeling_performer.serve`, which serves
any other model exactly as `transformers serve` does): concurrent OpenAI-client requests with long
prompts, for a linearized model against its softmax teacher served the same way.
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_chat_server.py."""

from modeling_performer.recipes.commands.bench_chat_server import main

if __name__ == "__main__":
    main()
