"""The quality/cost frontier of linearized chat models (`python scripts/chat_lm.py frontier`): one
row per configuration of the chat-lm recipe (`scripts/chat_frontier.sh`), each from that run's
results file, with the columns the targets are read from and each target met or not.

A row may be fitted on a fraction of the recipe's budget and scored on a screening subset; the row
says which (`budget`, `evaluation`), and a shared step (the teacher's transcripts, the layer ranking)
is counted in every row's fitting minutes, as a user running that row alone would spend it.
"""

from __future__ import annotations

import json
import pathlib

from .chat_lm import BOUNDS, meets

# Each target: (column, bound, "max" or "min"): the recipe's bounds (chat_lm.BOUNDS), and decoding
# at 8,192 tokens at least twice the teacher's speed.
_COLUMNS = {"documents_300": "documents.300.fraction", "documents_1000": "documents.1000.fraction",
            "documents_2000": "documents.2000.fraction", "documents_4000": "documents.4000.fraction",
            "perplexity_512": "perplexity_ratio.512", "perplexity_2048": "perplexity_ratio.2048",
            "perplexity_8192": "perplexity_ratio.8192", "chat": "chat.fraction", "cache_8192": "cache_fraction_8192",
            "decode_8192": "decode_speedup_8192", "fitting_minutes": "fitting.minutes"}
_BOUNDS = {**BOUNDS, "decode_8192": (2.0, "min")}
TARGETS = {name: (column, *_BOUNDS[name]) for name, column in _COLUMNS.items()}


def _get(row: dict, column: str):
    value = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def verdicts(row: dict) -> dict:
    """{target: True / False, or None where the row has no value for it}."""
    out = {}
    for name, (column, bound, kind) in TARGETS.items():
        value = _get(row, column)
        out[name] = None if value is None else bool(meets(value, bound, kind))
    return out


def mean_document_fraction(row: dict):
    """The row's document score as a fraction of the teacher's, averaged over the lengths asked
    (None where none was scored)."""
    docs = [v["fraction"] for v in row["documents"].values() if v.get("fraction") is not None]
    return sum(docs) / len(docs) if docs else None


def kept_layers(student: dict) -> list:
    kinds = student.get("attention_type")
    return [i for i, kind in enumerate(kinds) if kind == "softmax"] if isinstance(kinds, list) else []


def row_of(name: str, results: dict, budget: float, evaluation: str, shared_minutes: dict | None = None,
           decode: dict | None = None) -> dict:
    """One frontier row from a chat-lm results file (`chat_lm.py report`); `shared_minutes`
    ({step: minutes}) adds the steps run once for every row; `decode` ({"teacher_ms": ..,
    "student_ms": ..} at 8,192 tokens) where bench_chat measured it."""
    config, transfer = results["student"], results["transfer"]
    documents = {n: {"teacher": r.get("teacher"), "student": r.get("student"), "asked": r.get("asked"),
                     "fraction": r.get("fraction_of_teacher")} for n, r in results["documents"].items()}
    passkey = {n: {"teacher": r.get("teacher"), "student": r.get("student"), "fraction": r.get("fraction_of_teacher")}
               for n, r in results.get("passkey", {}).items()}
    cache = results.get("cache_bytes", {}).get("8192")
    steps = transfer["steps"] + transfer["end_to_end_steps"]
    minutes = dict(results["minutes"]["fitting"])
    for step, value in (shared_minutes or {}).items():
        minutes.setdefault(step, value)
    row = {
        "name": name, "budget": budget, "evaluation": evaluation,
        "softmax_layers": kept_layers(config), "lora_rank": transfer.get("lora_rank", 0),
        "local_window": config.get("local_window"), "sparse_cache_size": config.get("sparse_cache_size"),
        "linear_decay": config.get("linear_decay"), "feature_map": config.get("feature_map"),
        "perplexity_ratio": {n: r["student_ratio"] for n, r in results["perplexity"].items()},
        "documents": documents, "passkey": passkey,
        "chat": {"fraction": results["chat"]["fraction_of_teacher"], "identical": results["chat"]["identical_answers"]},
        "cache_fraction_8192": None if cache is None else cache["fraction"],
        "cache_mib_8192": None if cache is None else {"teacher": round(cache["teacher"] / 2**20, 2),
                                                      "student": round(cache["student"] / 2**20, 2)},
        "decode_speedup_8192": None if not decode else round(decode["teacher_ms"] / decode["student_ms"], 3),
        "decode_ms_8192": None if not decode else {"teacher": decode["teacher_ms"], "student": decode["student_ms"]},
        "fitting": {"steps": steps, "tokens": steps * results["fitted_tokens_per_step"] * transfer["batch_size"],
                    "minutes": round(sum(minutes.values()), 1), "by_step": minutes},
        "measured": {k: results.get(k) for k in ("date", "commit")},  # when and from which commit
        # the budget each target would take, from the run's fitting curve (chat_lm.tokens_needed)
        "tokens_needed": results.get("curve_tokens_needed"),
    }
    row["targets"] = verdicts(row)
    return row


def read_row(folder: pathlib.Path, name: str, shared_minutes: dict | None = None) -> dict:
    """The row of a frontier run's folder: its results.json, and frontier_row.json (what
    chat_frontier.sh ran it with: budget, evaluation, and decode times where measured)."""
    results = json.loads((folder / "results.json").read_text())
    settings = folder / "frontier_row.json"
    written = json.loads(settings.read_text()) if settings.exists() else {}
    return row_of(name, results, written.get("budget", 1.0), written.get("evaluation", "full"), shared_minutes,
                  written.get("decode"))


def read_minutes(path: pathlib.Path) -> dict:
    """A minutes.tsv's steps -> minutes (the last record of each)."""
    out = {}
    for line in (path.read_text().splitlines() if path.exists() else []):
        step, value = line.split("\t")[:2]
        out[step] = float(value.split()[0])
    return out


QUALITY = ("documents_300", "documents_1000", "documents_2000", "documents_4000", "perplexity_512",
           "perplexity_2048", "perplexity_8192", "chat")


def best_row(rows: list) -> dict | None:
    """The recommended row: one meeting every target if any does; otherwise the closest, read
    quality first (what a linearized model is for): the most quality targets met, then the best
    mean document score as a fraction of the teacher's, then the most cost targets met (cache,
    decoding, fitting time), then the lowest perplexity ratio at 2,048 tokens. Unmeasured targets
    count as unmet."""
    def key(row):
        targets = row["targets"]
        return (all(targets.values()), sum(1 for k in QUALITY if targets.get(k)), mean_document_fraction(row) or 0.0,
                sum(1 for k, v in targets.items() if v and k not in QUALITY),
                -(_get(row, "perplexity_ratio.2048") or float("inf")))

    return max(rows, key=key) if rows else None


def configuration(row: dict) -> tuple:
    """What a row fits, leaving out its budget and evaluation: rows equal here differ only in those."""
    return tuple(row.get(k) if not isinstance(row.get(k), list) else tuple(row[k])
                 for k in ("softmax_layers", "lora_rank", "local_window", "sparse_cache_size", "linear_decay",
                           "feature_map"))


def budget_rows(rows: list, name: str) -> list:
    """The rows fitting the same configuration as row NAME, by fitting tokens: its budget curve."""
    chosen = next(row for row in rows if row["name"] == name)
    return sorted((row for row in rows if configuration(row) == configuration(chosen)),
                  key=lambda row: row["fitting"]["tokens"])


def recommended(rows: list) -> dict | None:
    """The row to recommend: the best row's configuration (best_row), as fitted on the largest budget
    and scored on the full evaluation where such a run exists (screening rows choose; the chosen
    configuration is then run in full)."""
    best = best_row(rows)
    if best is None:
        return None
    full = [row for row in budget_rows(rows, best["name"]) if row["evaluation"] == "full"]
    return max(full, key=lambda row: row["budget"]) if full else best
