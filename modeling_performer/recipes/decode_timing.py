"""Batch-1 decoding speed of saved causal-LM folders against a teacher folder, paired: every model
prefills the same random context, then their decoding steps alternate, so that a busy machine slows
each alike (what scripts/decode_speed.py measures for the frontier rows; bench_chat.py times
models built from the teacher's shape in processes of their own)."""

import statistics
import time


def load(folder: str):
    """A saved folder (or a .gguf file) as a causal LM in fp32, eval mode: a Performer folder through
    this package, any other through transformers' Auto class with SDPA attention (a GGUF file
    dequantized, as transformers loads it)."""
    import json
    import pathlib

    import torch
    from transformers import AutoModelForCausalLM

    if str(folder).endswith(".gguf"):
        path = pathlib.Path(folder)
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                    attn_implementation="sdpa").eval()
    config = json.loads((pathlib.Path(folder) / "config.json").read_text())
    if config.get("model_type") == "performer":
        from modeling_performer import PerformerForCausalLM

        return PerformerForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


def paired_decode(models: dict, context: int, steps: int = 16, warmup: int = 3, seed: int = 0) -> dict:
    """models: {name: causal LM}. Each prefills the same `context` random tokens (seeded); then
    `warmup` + `steps` greedy decoding steps, one model after the other within each step.
    -> {name: median ms per decoding step over the timed steps}."""
    import torch

    vocab = min(model.config.vocab_size for model in models.values())
    ids = torch.randint(3, vocab, (1, context), generator=torch.Generator().manual_seed(seed))
    state, times = {}, {name: [] for name in models}
    with torch.inference_mode():
        for name, model in models.items():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            state[name] = [out.cache, out.logits[:, -1:].argmax(-1)]
        for step in range(warmup + steps):
            position = torch.full((1, 1), context + step, dtype=torch.long)
            for name, model in models.items():
                cache, token = state[name]
                start = time.perf_counter()
                out = model(input_ids=token, position_ids=position, cache=cache, use_cache=True)
                times[name].append(time.perf_counter() - start)
                state[name][1] = out.logits[:, -1:].argmax(-1)
    return {name: round(1e3 * statistics.median(values[warmup:]), 3) for name, values in times.items()}
