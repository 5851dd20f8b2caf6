"""The chat-lm recipe's tasks: a fact hidden in a document and asked for through the chat template,
a pass key, short questions with checkable answers, the teacher's own transcripts to fit on, and
the measurements of a linearized chat model against its teacher (`scripts/chat_lm.py`).

Documents are filler from the bundled corpora (`data_cache/{text,bible,speeches}`): the training
split for what the recipe fits on, the test split for what it is scored on. The names, cities and
numbers of the facts fitted on and of the facts asked for are disjoint too, as are the short
prompts the teacher answers for fitting (`configuration/chat/prompts.jsonl`) and the questions
scored (`configuration/chat/questions.jsonl`).
"""

import json
import math
import os
import random
import re

from . import ROOT

CHAT_DIR = ROOT / "configuration" / "chat"
CORPORA = ("text", "bible", "speeches")
NAMES = {"train": ["Amara", "Bertil", "Caspian", "Delphine", "Emeric", "Fenella", "Gideon", "Halima", "Ignatius",
                   "Jolanda", "Kasimir", "Leocadia", "Mathis", "Noemi", "Oswin", "Perpetua", "Quillon", "Rosalind",
                   "Severin", "Theodora"],
         "test": ["Anselm", "Brigitta", "Cornelius", "Dagny", "Eustace", "Florentina", "Gwendal", "Hortense",
                  "Isidore", "Juniper", "Leopold", "Marisol", "Nikander", "Ottilie", "Pelagia", "Radomir",
                  "Sabine", "Tobiah", "Valentina", "Wendelin"]}
CITIES = {"train": ["Lisbon", "Oslo", "Nairobi", "Lima", "Seoul", "Toronto", "Helsinki", "Dublin", "Hanoi", "Santiago",
                    "Warsaw", "Manila", "Quito", "Dakar", "Perth", "Riga"],
          "test": ["Montevideo", "Reykjavik", "Tbilisi", "Kampala", "Osaka", "Bogota", "Tallinn", "Zagreb",
                   "Auckland", "Marrakesh", "Vilnius", "Havana", "Bergen", "Accra", "Porto", "Lyon"]}
SEEDS = {"train": 1, "test": 2}


def write_atomically(path, text: str) -> None:
    """Writes beside the path, then moves into place: a kill leaves the old file or the new one."""
    import pathlib

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def write_json(path, record: dict) -> None:
    write_atomically(path, json.dumps(record, indent=1))


def corpus_ids(tokenizer, split: str) -> dict:
    """{corpus: its split's token ids, the texts joined by a blank line (the Bible's verses by a space)}."""
    out = {}
    for corpus in CORPORA:
        path = ROOT / "data_cache" / corpus / f"{split}.jsonl"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run python scripts/prepare_data.py --datasets {' '.join(CORPORA)}")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        # the plays and speeches are texts; the Bible corpus is a translation set: its English verses
        texts = [row["text"] if "text" in row else row["en"] for row in rows]
        out[corpus] = tokenizer(("\n\n" if "text" in rows[0] else " ").join(texts), add_special_tokens=False)["input_ids"]
    return out


def _filler(ids: dict, length: int, rng: random.Random) -> list:
    corpus = rng.choice([c for c in sorted(ids) if len(ids[c]) > length] or [max(ids, key=lambda c: len(ids[c]))])
    source = ids[corpus]
    if len(source) <= length:
        raise SystemExit(f"the {corpus} corpus holds {len(source)} tokens: too few for a document of {length}")
    start = rng.randrange(len(source) - length)
    return source[start:start + length]


def _plant(tokenizer, filler: list, sentence: str, depth: float) -> str:
    """The filler with `sentence` at `depth` (0-1) of it, at a line or sentence boundary near there."""
    text = tokenizer.decode(filler)
    at = int(len(text) * depth)
    cut = max(text.rfind("\n", 0, at), text.rfind(". ", 0, at) + 1)
    cut = cut if cut > 0 else at
    return f"{text[:cut].rstrip()}\n{sentence}\n{text[cut:].lstrip()}"


def depths(count: int) -> list:
    """`count` depths spread evenly over 10-90% of a document."""
    return [0.1 + 0.8 * i / max(count - 1, 1) for i in range(count)]


def fact_items(tokenizer, ids: dict, split: str, lengths, per_length: int) -> list:
    """Documents of each length (in tokens, the fact included) with one fact planted at depths 10-90%,
    asked for at the end through the chat template. Every other fact is a city, the rest a number."""
    rng = random.Random(SEEDS[split] * 1000 + 17)
    items = []
    for length in lengths:
        for i, depth in enumerate(depths(per_length)):
            name = rng.choice(NAMES[split])
            if i % 2:
                value = str(rng.randrange(1000, 10000))
                sentence, question = f"{name}'s lucky number is {value}.", f"What is {name}'s lucky number?"
            else:
                value = rng.choice(CITIES[split])
                sentence, question = f"{name}'s favourite city is {value}.", f"What is {name}'s favourite city?"
            filler = _filler(ids, max(length - len(tokenizer(sentence)["input_ids"]) - 2, 8), rng)
            document = _plant(tokenizer, filler, sentence, depth)
            items.append({"task": "document", "length": length, "depth": round(depth, 3), "answers": [value],
                          "content": f"{document}\n\nAnswer from the text above. {question}"})
    return items


def passkey_items(tokenizer, ids: dict, split: str, lengths, per_length: int) -> list:
    """A 5-digit pass key said twice at depths 10-90% of a filler document, asked for at the end."""
    rng = random.Random(SEEDS[split] * 1000 + 29)
    items = []
    for length in lengths:
        for depth in depths(per_length):
            key = str(rng.randrange(10000, 100000))
            sentence = f"The pass key is {key}. Remember it. {key} is the pass key."
            filler = _filler(ids, max(length - len(tokenizer(sentence)["input_ids"]) - 2, 8), rng)
            items.append({"task": "passkey", "length": length, "depth": round(depth, 3), "answers": [key],
                          "content": f"{_plant(tokenizer, filler, sentence, depth)}\n\nWhat is the pass key?"})
    return items


def chat_questions() -> list:
    rows = [json.loads(line) for line in (CHAT_DIR / "questions.jsonl").read_text().splitlines() if line.strip()]
    return [{"task": "chat", "length": 0, "answers": row["answers"], "content": row["question"]} for row in rows]


def chat_prompts() -> list:
    rows = [json.loads(line) for line in (CHAT_DIR / "prompts.jsonl").read_text().splitlines() if line.strip()]
    return [{"task": "prompt", "length": 0, "answers": [], "content": row["prompt"]} for row in rows]


def is_correct(answer: str, answers) -> bool:
    """Whether one of the accepted answers appears in the reply as a word (case and spacing aside)."""
    text = " ".join(answer.lower().split())
    return any(re.search(rf"(?<![a-z0-9]){re.escape(a.lower())}(?![a-z0-9])", text) for a in answers)


def prompt_text(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def generate_answers(model, tokenizer, items, max_new_tokens: int, batch_size: int = 4, progress: bool = True,
                     desc: str = "answers") -> list:
    """Greedy replies to each item's chat prompt, in batches of similar length (left padded)."""
    import torch
    from tqdm.auto import tqdm

    texts = [prompt_text(tokenizer, item["content"]) for item in items]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    replies = [None] * len(items)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc=desc):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
        for r, i in enumerate(rows):
            replies[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
    return replies


def transcript(tokenizer, item: dict, reply: str) -> str:
    """One chat exchange as text, in the tokenizer's template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": item["content"]},
                                          {"role": "assistant", "content": reply}], tokenize=False)


def pack_rows(tokenizer, texts, seq_len: int) -> list:
    """Texts joined into rows of at most seq_len tokens, none cut (a longer text is a row alone, cut)."""
    rows, current, used = [], [], 0
    for text in texts:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if current and used + n > seq_len:
            rows.append("".join(current))
            current, used = [], 0
        current.append(text)
        used += n
    if current:
        rows.append("".join(current))
    return rows


def plain_rows(tokenizer, ids: dict, seq_len: int, count: int, seed: int) -> list:
    """`count` windows of seq_len tokens of plain text, drawn from the corpora in turn, as text."""
    rng = random.Random(seed)
    return [tokenizer.decode(_filler({c: ids[c]}, seq_len - 8, rng))
            for c in (CORPORA * math.ceil(count / len(CORPORA)))[:count]]


TEACHER_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
# The recipe's targets: what each asks and its bound, (bound, "min" or "max"). The frontier
# (modeling_performer.recipes.frontier) judges its rows on the same bounds, and adds decoding speed.
TARGETS = {
    "documents_300": "document questions at 300 tokens: at least 90% of the teacher's score",
    "documents_1000": "document questions at 1,000 tokens: at least 90% of the teacher's score",
    "documents_2000": "document questions at 2,000 tokens: at least 90% of the teacher's score",
    "documents_4000": "document questions at 4,000 tokens: at least 75% of the teacher's score",
    "perplexity_512": "student perplexity at 512 tokens within 5% of the teacher's",
    "perplexity_2048": "student perplexity at 2,048 tokens within 5% of the teacher's",
    "perplexity_8192": "student perplexity at 8,192 tokens within 15% of the teacher's",
    "chat": "short chat accuracy at least 95% of the teacher's",
    "cache_8192": "cache at most 1/8 of the teacher's KV cache at 8,192 tokens",
    "fitting_minutes": "convert, rank the layers, transfer and fine-tune in 60 minutes or less",
}
BOUNDS = {"documents_300": (0.9, "min"), "documents_1000": (0.9, "min"), "documents_2000": (0.9, "min"),
          "documents_4000": (0.75, "min"), "perplexity_512": (1.05, "max"), "perplexity_2048": (1.05, "max"),
          "perplexity_8192": (1.15, "max"), "chat": (0.95, "min"), "cache_8192": (1 / 8, "max"),
          "fitting_minutes": (60.0, "max")}


def meets(value: float, bound: float, kind: str) -> bool:
    """Whether VALUE meets a bound of KIND "max" (at most) or "min" (at least)."""
    return value <= bound if kind == "max" else value >= bound


def _fraction(student, teacher):
    return round(student / teacher, 4) if teacher else None


def teacher_name(source: str) -> str:
    """How results name the teacher: TEACHER_NAME for SmolLM2's GGUF file, the source itself otherwise."""
    return TEACHER_NAME if source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") else source


def assemble_results(partial: dict, minutes: dict, transfer: dict, rows_tokens: list, student_dir: str,
                     teacher_dir: str, student_config: dict, source: str) -> dict:
    """The results file of the chat-lm recipe from the evaluation's parts (`chat_lm.py evaluate`),
    the minutes of each fitting step, the transfer's metrics and the token count of every fitted row."""
    language = {k.split("-", 1)[1]: v for k, v in partial.items() if k.startswith("language-")}
    runs = [r for r in ("student", "student_without_sparse_cache") if any(r in v for v in language.values())]
    perplexity = {n: {"teacher": v["teacher"]["perplexity"], **{r: v[r]["perplexity"] for r in runs},
                      **{f"{r}_ratio": v[r]["ratio"] for r in runs}, "tokens": v["tokens"]}
                  for n, v in language.items()}
    agreement = {n: {r: {"top1": v[r]["top1_agreement"], "kl": v[r]["kl"]} for r in runs}
                 for n, v in language.items() if int(n) <= 2048}
    cache = {n: {"teacher": v["teacher"]["cache_bytes"], **{r: v[r]["cache_bytes"] for r in runs},
                 "fraction": round(v["student"]["cache_bytes"] / v["teacher"]["cache_bytes"], 5)}
             for n, v in language.items() if int(n) >= 2048}

    def by_length(task):
        runs = {k.split("-", 1)[1]: v for k, v in partial.items() if k.startswith(task + "-")}
        table = {}
        for run, scores in runs.items():
            for length, acc in scores["accuracy"].items():
                table.setdefault(length, {})[run] = acc
                table[length]["asked"] = scores["asked"][length]
        for row in table.values():
            row["fraction_of_teacher"] = _fraction(row.get("student", 0), row.get("teacher", 0))
        return dict(sorted(table.items(), key=lambda kv: int(kv[0])))

    chat_t, chat_s = partial["chat-teacher"], partial["chat-student"]
    chat = {"teacher": chat_t["accuracy"]["0"], "student": chat_s["accuracy"]["0"], "questions": chat_t["asked"]["0"],
            "identical_answers": round(sum(a == b for a, b in zip(chat_t["replies"], chat_s["replies"]))
                                       / len(chat_t["replies"]), 4)}
    chat["fraction_of_teacher"] = _fraction(chat["student"], chat["teacher"])
    steps = transfer["steps"] + transfer["end_to_end_steps"]
    mean_tokens = sum(rows_tokens) / max(len(rows_tokens), 1)
    curve = []
    points = [k for k in partial if re.fullmatch(r"curve-\d+", k)]
    for key in sorted(points, key=lambda k: int(k.split("-")[1])):
        step = int(key.split("-")[1])
        curve.append({"step": step, "fraction": round(step / steps, 3), "tokens": round(step * mean_tokens),
                      "ppl_2048": partial[key]["ppl_2048"], "documents": partial[key]["documents"]})
    # The finished student: its perplexity on the curve's own windows, its answers to the same questions.
    curve_lengths = {str(n) for n in partial["settings"]["curve_lengths"]}
    final = partial.get("curve-final", {})
    curve.append({"step": steps, "fraction": 1.0, "tokens": round(steps * mean_tokens),
                  "ppl_2048": final.get("student"),
                  "documents": {n: row.get("student") for n, row in by_length("documents").items()
                                if n in curve_lengths}})
    curve_teacher = {"ppl_2048": final.get("teacher"),
                     "documents": {n: row.get("teacher") for n, row in by_length("documents").items()
                                   if n in curve_lengths}}

    fitting, evaluation = dict(minutes), dict(partial.get("minutes", {}))
    # the transfer's speed, where its minutes were recorded in one go
    speed = steps * mean_tokens / fitting["chat-transfer"] if fitting.get("chat-transfer") else None
    results = {
        "teacher": teacher_name(source), "teacher_dir": teacher_dir, "student_dir": student_dir,
        "student": {k: student_config.get(k) for k in ("attention_type", "feature_map", "local_window",
                                                        "sparse_cache_size", "num_hidden_layers", "linear_decay")},
        "transfer": {k: transfer.get(k) for k in ("steps", "end_to_end_steps", "end_to_end_loss", "kl_positions",
                                                  "seq_len", "batch_size", "learning_rate",
                                                  "end_to_end_learning_rate", "device", "precision",
                                                  "lora_rank")},
        "fitted_rows": len(rows_tokens), "fitted_tokens_per_step": round(mean_tokens),
        "perplexity": perplexity, "agreement": agreement, "documents": by_length("documents"),
        "passkey": by_length("passkey"), "chat": chat, "cache_bytes": cache, "curve": curve,
        "curve_teacher": curve_teacher, "curve_tokens_needed": tokens_needed(curve, curve_teacher, speed),
        "minutes": {"fitting": fitting, "fitting_total": round(sum(fitting.values()), 1),
                    "evaluation": evaluation, "evaluation_total": round(sum(evaluation.values()), 1)},
    }
    results["targets"] = targets(results)
    return results


def _power_law_budget(points: list, goal: float) -> tuple:
    """(tokens, power, note): where a shortfall falling as a power law of the tokens through the last
    two (tokens, shortfall) points reaches GOAL; tokens is None where it is met already, or where the
    shortfall did not fall between those points."""
    if len(points) < 2:
        return None, None, "fewer than two fitted points"
    (x0, y0), (x1, y1) = points[-2:]
    if y1 <= goal:
        return None, None, "met"
    if y0 <= 0 or y1 >= y0:
        return None, None, "the shortfall did not fall over the last two points"
    slope = math.log(y1 / y0) / math.log(x1 / x0)
    return round(x1 * (goal / y1) ** (1 / slope)), round(slope, 3), "power law through the last two points"


def tokens_needed(curve: list, teacher: dict, tokens_per_minute: float | None = None) -> dict:
    """A rough transfer-token budget for each target the curve measures: perplexity within 5% of the
    teacher's at 2,048 tokens (the shortfall is the excess ratio - 1), and at least 90% of the teacher's
    document score at each curve length with a target (the shortfall is 1 - the fraction of the teacher's), each
    extended as a power law of the tokens through the curve's last two fitted points (None where met,
    or where the shortfall did not fall between them). With the transfer's `tokens_per_minute`, the
    minutes that budget takes at the same speed."""
    fitted = [p for p in curve if p["tokens"] > 0]
    shortfalls = {}  # target -> ((tokens, shortfall) points, the shortfall its bound allows)
    if teacher.get("ppl_2048"):
        shortfalls["perplexity_2048"] = ([(p["tokens"], p["ppl_2048"] / teacher["ppl_2048"] - 1)
                                          for p in fitted if p.get("ppl_2048")], BOUNDS["perplexity_2048"][0] - 1)
    for length, score in sorted((teacher.get("documents") or {}).items(), key=lambda kv: int(kv[0])):
        key = f"documents_{length}"
        if score and key in BOUNDS:
            shortfalls[key] = ([(p["tokens"], 1 - p["documents"][length] / score)
                                for p in fitted if p.get("documents", {}).get(length) is not None],
                               1 - BOUNDS[key][0])
    out, notes = {}, {}
    for key, (points, goal) in shortfalls.items():
        tokens, power, note = _power_law_budget(points, goal)
        out[key] = tokens
        notes[key] = note if power is None else f"{note}, power {power}"
        if tokens is not None and tokens_per_minute:
            out[f"{key}_minutes"] = round(tokens / tokens_per_minute, 1)
    return {**out, "notes": notes, "note": "a rough extrapolation of the fitting curve"}


def targets(results: dict) -> dict:
    """Each target of TARGETS: its value and whether it is met (None where it was not measured)."""
    def ratio(n):
        row = results["perplexity"].get(n)
        return None if row is None else row["student_ratio"]

    def documents(n):
        row = results["documents"].get(n)
        return None if row is None else row["fraction_of_teacher"]

    cache = results["cache_bytes"].get("8192")
    values = {**{f"documents_{n}": documents(n) for n in ("300", "1000", "2000", "4000")},
              **{f"perplexity_{n}": ratio(n) for n in ("512", "2048", "8192")},
              "chat": results["chat"]["fraction_of_teacher"],
              "cache_8192": None if cache is None else cache["fraction"],
              "fitting_minutes": results["minutes"]["fitting_total"]}
    return {k: {"target": TARGETS[k], "value": v, "met": None if v is None else meets(v, *BOUNDS[k])}
            for k, v in values.items()}
