"""Texts for attention transfer and the measurements on it: a file's texts, cut into windows of
tokens."""

import json
import pathlib


def read_texts(path: pathlib.Path) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if "text" not in row:
                        raise SystemExit(f"{path}:{number}: a .jsonl row needs a 'text' field")
                    texts.append(row["text"])
        return texts
    return [path.read_text()]


def token_windows(tokenizer, texts, seq_len: int):
    """Cuts the tokenised corpus into windows of seq_len tokens (special tokens included)."""
    import torch

    # The special tokens the tokenizer puts around one text ([CLS] ... [SEP] for BERT, none for GPT-2).
    full, inner = tokenizer("x")["input_ids"], tokenizer("x", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(full)) if full[i:i + len(inner)] == inner)
    prefix, suffix = full[:start], full[start + len(inner):]
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise SystemExit(f"--seq-len {seq_len} leaves no room next to the tokenizer's special tokens")
    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = [prefix + ids[i:i + body] + suffix for i in range(0, len(ids) - body + 1, body)]
    if not windows:
        raise SystemExit(f"the data holds {len(ids)} tokens: not enough for one window of {seq_len}")
    return torch.tensor(windows)
