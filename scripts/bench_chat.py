#!/usr/bin/env python
"""A linearized chat model against its teacher, at the teacher's real shape: decoding ms per token,
prefill seconds, time to the first token, cache bytes and peak memory, at contexts from 512 to 16k
tokens, batch 1 and 8, ratios taken in the same run.
`--help` gives the options; the tool is modeling_performer/recipes/commands/bench_chat.py."""

from modeling_performer.recipes.commands.bench_chat import main

if __name__ == "__main__":
    main()
