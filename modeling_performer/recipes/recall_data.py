"""The sequences of the recall tasks: multi-query associative recall (`mqar_batch`) and a pass key
planted in the bundled plays (`passkey_batch`, `bundled_tokens`), drawn from seeded generators that
keep training, held-out and transfer sequences apart."""

import functools
import pathlib
import sys

import torch

from . import ROOT


BUNDLED_TEXT = ROOT / "data_cache" / "text"
FILLER = 0
# generators of training, held-out and transfer sequences, never equal
TRAIN_SEED, TEST_SEED, TRANSFER_SEED = 0, 10**6, 2 * 10**6


def mqar_batch(generator: torch.Generator, batch: int, seq_len: int, pairs: int, vocab: int, gap: int):
    """-> (ids [batch, seq_len], targets [batch, seq_len]: the value at each answer position, -100 elsewhere).
    Pair i sits at positions 2i, 2i+1; each key is asked once, at distinct positions >= 2 pairs + gap."""
    half = vocab // 2
    first_query = 2 * pairs + gap
    if half - 1 < pairs:
        raise ValueError(f"vocabulary {vocab} has {half - 1} key tokens, fewer than {pairs} pairs")
    if seq_len - first_query < pairs:
        raise ValueError(f"sequence length {seq_len} leaves {seq_len - first_query} query positions after "
                         f"{pairs} pairs and a gap of {gap}: need at least {pairs}")
    keys = torch.rand(batch, half - 1, generator=generator).argsort(-1)[:, :pairs] + 1
    values = torch.randint(half, vocab, (batch, pairs), generator=generator)
    ids = torch.full((batch, seq_len), FILLER, dtype=torch.long)
    ids[:, 0:2 * pairs:2], ids[:, 1:2 * pairs:2] = keys, values
    positions = torch.rand(batch, seq_len - first_query, generator=generator).argsort(-1)[:, :pairs] + first_query
    order = torch.rand(batch, pairs, generator=generator).argsort(-1)  # which key is asked where
    rows = torch.arange(batch)[:, None]
    ids[rows, positions] = keys.gather(1, order)
    targets = torch.full((batch, seq_len), -100, dtype=torch.long)
    targets[rows, positions] = values.gather(1, order)
    return ids, targets


# The pass-key task: a 5-digit key planted in running text at a random depth, asked for at the end.
DIGITS = 5
ANSWERS = DIGITS + 1  # logits kept: the ask mark and the key's digits after it (the last predicts nothing)


def passkey_batch(generator: torch.Generator, stream: torch.Tensor, batch: int, length: int, min_gap: int,
                  text_vocab: int):
    """Windows of the token stream with `key-mark d1..d5` planted at a random depth and
    `ask-mark d1..d5` at the end. Digits are the ids text_vocab..text_vocab + 9, the key mark
    text_vocab + 10, the ask mark text_vocab + 11: ids the text never uses. At least `min_gap` text
    tokens lie between the planted key and the ask mark.
    -> (ids [batch, length], targets [batch, ANSWERS]: the digits at the last ANSWERS positions
    (-100 at the very last), gap [batch]: the text tokens between the planted key and the ask mark)."""
    text_len = length - 2 * ANSWERS
    if text_len - min_gap < 0:
        raise ValueError(f"length {length} leaves {text_len} text tokens, fewer than the gap {min_gap}")
    if len(stream) <= text_len:
        raise ValueError(f"the text has {len(stream)} tokens, too few for windows of {text_len}")
    starts = torch.randint(0, len(stream) - text_len, (batch, 1), generator=generator)
    text = stream[starts + torch.arange(text_len)]
    key = torch.randint(0, 10, (batch, DIGITS), generator=generator) + text_vocab
    depth = torch.randint(0, text_len - min_gap + 1, (batch, 1), generator=generator)
    position = torch.arange(text_len + ANSWERS)[None]
    # before the key the text as it is; after it the text shifted by the planted block
    body = text.gather(1, torch.where(position < depth, position, position - ANSWERS).clamp(0, text_len - 1))
    block = torch.cat([torch.full((batch, 1), text_vocab + 10), key], 1)
    planted = (position >= depth) & (position < depth + ANSWERS)
    body = torch.where(planted, block.gather(1, (position - depth).clamp(0, ANSWERS - 1)), body)
    ids = torch.cat([body, torch.full((batch, 1), text_vocab + 11), key], 1)
    targets = torch.cat([key, torch.full((batch, 1), -100)], 1)
    return ids, targets, (text_len - depth).flatten()


@functools.lru_cache(maxsize=None)  # one tokenisation per process: every student's task reads the same plays
def bundled_tokens(folder, split: str) -> tuple:
    """The plays of one split (<folder>/<split>.jsonl; the bundled ones in data_cache/text are
    prepared on first use), tokenised by the bundled tokenizer into one stream.
    -> (ids, the tokenizer's vocabulary size)."""
    import subprocess

    from modeling_performer.recipes.texts import read_texts
    from transformers import AutoTokenizer

    from modeling_performer.bundled import tokenizer_path

    path = pathlib.Path(folder) / f"{split}.jsonl"
    if not path.exists():
        if pathlib.Path(folder).resolve() != BUNDLED_TEXT:
            raise SystemExit(f"--passkey-data: {path} does not exist")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--datasets", "text"], check=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path()))
    ids = tokenizer(read_texts(path), add_special_tokens=False)["input_ids"]
    return torch.tensor([token for row in ids for token in row]), len(tokenizer)
