"""Datasets of the lm-evaluation-harness tasks in this folder, built from `plays_test.jsonl` beside
this file: the held-out test split of the bundled plays (scripts/prepare_data.py, `text`: All's
Well That Ends Well and the Sonnets, passages of at most 1,500 characters). No training stage of
the package fits this split.

- `performer_plays_ppl` (loglikelihood_rolling): one document per work, its passages joined by a
  blank line, scored in rolling windows of the model's length.
- `performer_plays_next_line` (multiple_choice): for each passage, four lines of it as context and
  four candidate next lines: the true one and three other lines of the same work (a fixed seed).
"""

import json
import pathlib
import random

import datasets

DATA = pathlib.Path(__file__).resolve().parent / "plays_test.jsonl"
CONTEXT_LINES = 4
CHOICES = 4


def _passages():
    with open(DATA, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def works(**kwargs):
    """-> DatasetDict(test=[{"source", "text"}]): the passages of each work, joined in order."""
    joined = {}
    for row in _passages():
        joined.setdefault(row["source"], []).append(row["text"])
    rows = [{"source": source, "text": "\n\n".join(texts)} for source, texts in joined.items()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_rolling(doc, results):
    (loglikelihood,) = results
    words = len(doc["text"].split())
    size = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}


def next_lines(**kwargs):
    """-> DatasetDict(test=[{"context", "choices", "label"}]), the same on every machine."""
    rng = random.Random(0)
    passages = _passages()
    lines_of = {}
    for row in passages:
        lines_of.setdefault(row["source"], []).extend(line.strip() for line in row["text"].splitlines())
    pool = {source: sorted({line for line in lines if len(line) >= 12}) for source, lines in lines_of.items()}
    rows = []
    for row in passages:
        lines = [line.strip() for line in row["text"].splitlines() if len(line.strip()) >= 12]
        if len(lines) < CONTEXT_LINES + 1:
            continue
        start = rng.randrange(len(lines) - CONTEXT_LINES)
        context, answer = lines[start:start + CONTEXT_LINES], lines[start + CONTEXT_LINES]
        others = [line for line in pool[row["source"]] if line != answer and line not in context]
        choices = rng.sample(others, CHOICES - 1) + [answer]
        rng.shuffle(choices)
        rows.append({"context": "\n".join(context), "choices": choices, "label": choices.index(answer)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
