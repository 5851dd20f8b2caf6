"""The tables of the README and the documentation, each rendered from its committed results file in
docs/figures (`TABLES`: name -> a function returning markdown)."""

from __future__ import annotations

import json

from .chat_lm import BOUNDS
from .docs_check import FIGURES
from .frontier import budget_rows, kept_layers


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def _load(name: str) -> dict:
    return json.loads((FIGURES / name).read_text())


def chat_table() -> str:
    """SmolLM2-135M-Instruct against its linearized student: decoding per token, eager and compiled."""
    data = _load("chat_decode.json")
    rows = {(r["kind"], r["mode"], r["batch"], r["context"]): r for r in data["rows"]}
    lines = ["| batch | context | teacher ms/token | student ms/token (eager / compiled) | teacher / student (eager / compiled) "
             "| cache MiB: teacher / student |",
             "|---|---|---|---|---|---|"]
    for batch in sorted({key[2] for key in rows}):
        for context in sorted({key[3] for key in rows if key[2] == batch}):
            teacher = rows.get(("teacher", "eager", batch, context))
            eager = rows.get(("student", "eager", batch, context))
            compiled = rows.get(("student", "compiled", batch, context))
            if not (teacher and eager and compiled):
                continue
            t, e, c = teacher["ms_per_token"], eager["ms_per_token"], compiled["ms_per_token"]
            lines.append(f"| {batch} | {context:,} | {t:.1f} | {e:.1f} / {c:.1f} | {t / e:.2f}x / {t / c:.2f}x "
                         f"| {teacher['cache_mib']:.1f} / {eager['cache_mib']:.1f} |")
    source = f"`docs/figures/chat_decode.json` ({data['weights']}, {data['device_name']}, {data['threads']} threads, " \
             f"{data['date'][:10]})"
    return "\n".join(lines) + f"\n\nFrom {source}; teacher: eager, transformers' dynamic cache.\n"


def _chat_rows() -> dict:
    return {(r["kind"], r["mode"], r["batch"], r["context"]): r for r in _load("chat_decode.json")["rows"]}


def chat_decode_table() -> str:
    """Every decoding column of chat_decode.json: eager and compiled, student and teacher."""
    rows = _chat_rows()
    lines = ["| batch | context | student ms/token | teacher ms/token | teacher / student | student compiled "
             "| teacher compiled (static cache) | compiled teacher / compiled student | compiled teacher / eager student "
             "| student cache | teacher cache |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for batch, context in sorted({(key[2], key[3]) for key in rows}):
        cells = [rows.get((kind, mode, batch, context)) for kind, mode in
                 (("student", "eager"), ("teacher", "eager"), ("student", "compiled"), ("teacher", "compiled"))]
        if not all(cells):
            continue
        student, teacher, student_c, teacher_c = (c["ms_per_token"] for c in cells)
        lines.append(f"| {batch} | {context:,} | {student:.1f} | {teacher:.1f} | **{teacher / student:.2f}** "
                     f"| {student_c:.1f} | {teacher_c:.1f} | {teacher_c / student_c:.2f} | {teacher_c / student:.2f} "
                     f"| {cells[0]['cache_mib']:.1f} MiB | {cells[1]['cache_mib']:.1f} MiB |")
    return "\n".join(lines) + "\n"


def chat_prefill_table() -> str:
    """Prefill, time to the first token and peak RSS of chat_decode.json (batch 1, eager)."""
    rows = _chat_rows()
    lines = ["| prompt | student prefill | teacher prefill | student / teacher | student TTFT | teacher TTFT "
             "| student peak RSS | teacher peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for context in sorted({key[3] for key in rows if key[2] == 1}):
        student, teacher = rows.get(("student", "eager", 1, context)), rows.get(("teacher", "eager", 1, context))
        if not (student and teacher):
            continue
        lines.append(f"| {context:,} | {student['prefill_s']:.2f} s | {teacher['prefill_s']:.2f} s "
                     f"| **{student['prefill_s'] / teacher['prefill_s']:.2f}** | {student['ttft_s']:.2f} s "
                     f"| {teacher['ttft_s']:.2f} s | {student['peak_rss_mib']:.0f} MiB | {teacher['peak_rss_mib']:.0f} MiB |")
    return "\n".join(lines) + "\n"


def serving_table() -> str:
    """Many sequences decoded at once: tokens/s, cache and peak memory against GPT-2."""
    data = _load("serving.json")
    rows = {(r["kind"], r["context"], r["batch"]): r for r in data["results"]}
    lines = ["| context | batch | FAVOR+ tokens/s | Hedgehog + window 64 | GPT-2 (SDPA, KV cache) | FAVOR+ / GPT-2 "
             "| cache: ours / GPT-2 | peak RSS: ours / GPT-2 |",
             "|---|---|---|---|---|---|---|---|"]
    for context in data["settings"]["contexts"]:
        for batch in data["settings"]["batches"]:
            ours, window, gpt2 = (rows.get((kind, context, batch)) for kind in ("performer", "performer-window", "gpt2"))
            if not (ours and window and gpt2):
                continue
            lines.append(
                f"| {context} | {batch} | {ours['decode_tokens_per_s']:.0f} | {window['decode_tokens_per_s']:.0f} "
                f"| {gpt2['decode_tokens_per_s']:.0f} | {ours['decode_tokens_per_s'] / gpt2['decode_tokens_per_s']:.2f}x "
                f"| {ours['cache_mib']:.1f} / {gpt2['cache_mib']:.0f} MiB "
                f"| {ours['peak_rss_mib'] / 1024:.1f} / {gpt2['peak_rss_mib'] / 1024:.1f} GiB |")
    return "\n".join(lines) + "\n"


def serving_batching_table() -> str:
    """The chat server under concurrent clients, with and without continuous batching
    (serving_chat.json's points that name a batching mode)."""
    data = _load("serving_chat.json")
    rows = [r for r in data["results"] if "batching" in r]
    alone = {(r["model"], r["batching"], r["context"]): r["tokens_per_s"] for r in rows if r["clients"] == 1}
    decode = {(r["model"], r["batching"], r["context"]): r["decode_tokens_per_s_aggregate"]
              for r in rows if r["clients"] == 1}
    lines = ["| context (answer) | clients | model | batching | answer tokens/s, all clients | x one client | aggregate "
             "decode tokens/s | x one client | TTFT p50 / p95 (s) | peak RSS (GiB) |", "|---" * 10 + "|"]
    for r in sorted(rows, key=lambda r: (r["context"], r["clients"], r["label"], r["batching"])):
        key = (r["model"], r["batching"], r["context"])
        one, one_decode = alone.get(key), decode.get(key)
        rate = r["decode_tokens_per_s_aggregate"]
        answer = r.get("new_tokens", data["new_tokens"])
        lines.append(f"| {r['context']:,} ({answer}) | {r['clients']} | {r['label']} | {r['batching']} "
                     f"| {r['tokens_per_s']:.2f} | "
                     + (f"{r['tokens_per_s'] / one:.2f}x" if one and r["clients"] > 1 else "")
                     + f" | {rate:.1f} | " + (f"{rate / one_decode:.2f}x" if one_decode and r["clients"] > 1 else "")
                     + f" | {r['ttft_s_median']:.1f} / {r['ttft_s_p95']:.1f} | {r['peak_rss_mib'] / 1024:.2f} |")
    return "\n".join(lines) + "\n"


def _attention_table(name: str, methods: dict) -> str:
    results = _load(name)["results"]
    lines = ["| T | " + " | ".join(methods.values()) + " |", "|---" * (len(methods) + 1) + "|"]
    for length in sorted(results, key=int):
        cells = []
        for method in methods:
            point = results[length].get(method, {"error": "not run"})
            cells.append(point["error"] if "error" in point else
                         f"{point['seconds']:.3g} s / {point['peak_bytes'] / 2**20:.0f} MiB")
        if any("error" not in results[length].get(m, {"error": 1}) for m in methods):
            lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def attention_table() -> str:
    """Forward + backward of one attention layer (attention.json): seconds / peak extra memory."""
    return _attention_table("attention.json", {"favor": "FAVOR+", "favor-causal": "FAVOR+ causal",
                                               "hedgehog-window-causal": "Hedgehog + window 64 causal",
                                               "sdpa": "SDPA", "sdpa-causal": "SDPA causal"})


def performer_pytorch_table() -> str:
    """The same against performer-pytorch (attention_performer_pytorch.json)."""
    return _attention_table("attention_performer_pytorch.json",
                            {"favor": "FAVOR+", "performer-pytorch": "performer-pytorch", "favor-causal": "FAVOR+ causal",
                             "performer-pytorch-causal": "performer-pytorch causal"})


def decoding_table() -> str:
    """Decoding one sequence against GPT-2 (decoding.json)."""
    lines = ["| context | Performer ms/token | GPT-2 ms/token | GPT-2 / Performer | Performer cache | GPT-2 cache |",
             "|---|---|---|---|---|---|"]
    for row in _load("decoding.json")["rows"]:
        lines.append(f"| {row['context']} | {row['performer_ms']:.1f} | {row['gpt2_ms']:.1f} "
                     f"| {row['gpt2_ms'] / row['performer_ms']:.2f} | {row['performer_cache_mib']:.2f} MiB "
                     f"| {row['gpt2_cache_mib']:.1f} MiB |")
    return "\n".join(lines) + "\n"


def training_table() -> str:
    """Training tokens/s and peak RSS per sequence length (training.json)."""
    data = _load("training.json")
    rows = {(r["kind"], r["length"]): r for r in data["results"]}
    kinds = {"performer": "FAVOR+", "performer-window": "Hedgehog + window 64", "softmax": "same stack, softmax (SDPA)",
             "gpt2": "GPT-2 (SDPA)"}
    lines = ["| T | " + " | ".join(kinds.values()) + " |", "|---" * (len(kinds) + 1) + "|"]
    for length in sorted({key[1] for key in rows}):
        cells = []
        for kind in kinds:
            row = rows.get((kind, length))
            cells.append("not run" if row is None or "tokens_per_s" not in row else
                         f"{row['tokens_per_s']:.0f} tokens/s, {row['peak_rss_mib'] / 1024:.1f} GiB")
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def memory_table() -> str:
    """Resident memory across repeated generate() calls (memory.json)."""
    data = _load("memory.json")
    names = {"greedy": "greedy", "sampling": "sampling", "beam-3": "beam search, 3 beams"}
    lines = ["| mode | RSS after warm-up | after %d calls | growth per call | Python heap growth per call |" % data["calls"],
             "|---|---|---|---|---|"]
    for key, label in names.items():
        r = data["results"][key]
        growth = f"{r['rss_growth_per_call_kib']:.0f} KiB" if r["rss_growth_per_call_kib"] else "0"
        lines.append(f"| {label} | {r['rss_after_warmup_mib']:.1f} MiB | {r['rss_after_calls_mib']:.1f} MiB "
                     f"| {growth} (ratio {r['rss_ratio']:.3f}) | {r['python_heap_growth_per_call_kib']:.2f} KiB |")
    return "\n".join(lines) + "\n"


def recall_table() -> str:
    """MQAR accuracy on held-out sequences per model and shape (recall.json); softmax with the steps it took."""
    results = _load("recall.json")["results"]
    shapes = sorted({(r["seq_len"], r["pairs"]) for r in results})
    labels = {"Hedgehog + W8 + sparse 2P (same weights)": "Hedgehog + W8, + sparse cache 2 x pairs (same weights)"}
    lines = ["| model (trained from scratch) | " + " | ".join(f"{t} tokens, {p} pairs" for t, p in shapes) + " |",
             "|---" * (len(shapes) + 1) + "|"]
    for model in dict.fromkeys(r["model"] for r in results):
        cells = []
        for shape in shapes:
            row = next((r for r in results if r["model"] == model and (r["seq_len"], r["pairs"]) == shape), None)
            cell = "not run" if row is None else f"{100 * row['accuracy']:.1f}%"
            if row is not None and model == "softmax":
                cell += f" ({row['steps_run']:,} steps)"
            cells.append(cell)
        lines.append(f"| {labels.get(model, model)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recall_linearized_table() -> str:
    """Recall beyond the window of a linearized MQAR teacher (recall_linearized.json); the best share
    of the teacher's accuracy in bold."""
    data = _load("recall_linearized.json")
    labels = {"FAVOR+ M=256 swap (no fitting)": "FAVOR+ M=256 swap, no fitting", "Hedgehog + W8": "Hedgehog + W8 (transfer)"}
    best = max(v for k, v in data["of_teacher"].items() if k != "softmax teacher")
    lines = ["| model (same teacher weights) | answer accuracy | of the teacher's |", "|---|---|---|"]
    for model, accuracy in data["accuracy"].items():
        share = f"{100 * data['of_teacher'][model]:.0f}%"
        share = f"**{share}**" if model != "softmax teacher" and data["of_teacher"][model] == best else share
        label = labels.get(model, model.replace("Hedgehog + W8 + sparse", "+ sparse cache"))
        lines.append(f"| {label} | {100 * accuracy:.1f}% | {share} |")
    return "\n".join(lines) + "\n"


def decay_recall_table() -> str:
    """MQAR with and without the decay gate, one run (recall_decay.json): accuracy per shape and the
    change against additive Hedgehog in points."""
    data = _load("recall_decay.json")
    results = data["results"]
    shapes = sorted({(r["seq_len"], r["pairs"]) for r in results})
    accuracy = {(r["model"], r["seq_len"], r["pairs"]): r["accuracy"] for r in results}
    lines = ["| model (trained from scratch, one run) | " + " | ".join(f"{t} tokens, {p} pairs" for t, p in shapes)
             + " |", "|---" * (len(shapes) + 1) + "|"]
    for model in dict.fromkeys(r["model"] for r in results):
        cells = []
        for shape in shapes:
            value = accuracy.get((model, *shape))
            cell = "not run" if value is None else f"{100 * value:.1f}%"
            base = accuracy.get(("Hedgehog", *shape))
            if value is not None and "decay" in model and base is not None:
                cell += f" ({100 * (value - base):+.1f} points)"
            cells.append(cell)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    steps = ", ".join(f"{r['steps_run']:,}" for r in results if r["model"] == "softmax")
    return "\n".join(lines) + (f"\n\nEvery model trained for the steps softmax took to solve each shape ({steps}), "
                               f"same seed and curriculum; {data['date'][:10]}.\n")


def decay_cost_table() -> str:
    """What the gate costs (decay_attention.json, decay_decode.json): gated over ungated time, same run."""
    kernels = _load("decay_attention.json")["results"]
    lines = ["| measure (CPU, fp32) | " + " | ".join(f"{int(t):,} tokens" for t in kernels) + " |",
             "|---" * (len(kernels) + 1) + "|"]
    names = {"favor-decay-causal": "FAVOR+ causal layer, forward + backward",
             "hedgehog-decay-causal": "Hedgehog causal layer, forward + backward",
             "hedgehog-window-decay-causal": "Hedgehog + window 64 causal layer, forward + backward",
             "favor-window-decay-causal": "FAVOR+ + window 64 causal layer, forward + backward"}
    for method, label in names.items():
        cells = []
        for row in kernels.values():
            gated, plain = row.get(method, {}), row.get(method.replace("-decay", ""), {})
            cells.append(f"{gated['seconds'] / plain['seconds']:.2f}x" if "seconds" in gated and "seconds" in plain
                         else "not run")
        if any(c != "not run" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    decode = _load("decay_decode.json")
    lines += ["", "| SmolLM2-135M shape, Hedgehog + window 64, eager | context | gated / ungated, steps alternating "
              "in one process | gated / ungated, separate processes |", "|---|---|---|---|"]
    for entry in decode["decay_ratios"]:
        paired = entry.get("ms_per_token_paired_decay_over_student")
        lines.append(f"| decoding step, batch {entry['batch']} | {entry['context']:,} | "
                     + ("not run" if paired is None else f"{paired:.3f}x")
                     + f" | {entry['ms_per_token_decay_over_student']:.3f}x |")
        if "prefill_s_decay_over_student" in entry:
            lines.append(f"| prefill, batch 1 | {entry['context']:,} | not run | "
                         f"{entry['prefill_s_decay_over_student']:.3f}x |")
    return "\n".join(lines) + "\n"


def _bound(key: str) -> str:
    """A chat-lm target's bound as the tables write it: ">= 90% of teacher", "<= 1.05x", "<= 1/8", "<= 60"."""
    value, kind = BOUNDS[key]
    if key.startswith(("documents", "chat")):
        shown = f"{value:.0%} of teacher"
    elif key.startswith("perplexity"):
        shown = f"{value:.2f}x"
    else:
        shown = f"1/{1 / value:.0f}" if key == "cache_8192" else f"{value:g}"
    return f"{'>=' if kind == 'min' else '<='} {shown}"


def chat_lm_table(name: str = "smollm2/results.json") -> str:
    """The chat-lm recipe: a linearized chat model against its teacher on held-out text and questions
    (the column of the student without its sparse cache where it has one)."""
    data = _load(name)
    targets = data["targets"]
    bare = "student_without_sparse_cache"

    def verdict(key):
        target = targets.get(key)
        if target is None or target["met"] is None:
            return ""
        return f"{_bound(key)}: " + ("met" if target["met"] else "**missed**")

    def ppl(row, run):
        return f"{row[run]:.2f} ({row[run + '_ratio']:.3f}x)" if run in row else ""

    def agree(row, run):
        return f"{_percent(row[run]['top1'])} / {row[run]['kl']:.3f}" if run in row else ""

    rows = []  # measure, teacher, student, student without the sparse cache, target
    for length, row in data["perplexity"].items():
        rows.append([f"perplexity, {int(length):,} tokens", f"{row['teacher']:.2f}", ppl(row, "student"),
                     ppl(row, bare), verdict(f"perplexity_{length}")])
    for length, row in data["agreement"].items():
        rows.append([f"next token: top-1 agreement / KL to the teacher, {int(length):,} tokens", "",
                     agree(row, "student"), agree(row, bare), ""])
    for task, label in (("documents", "fact in a document"), ("passkey", "pass key")):
        for length, row in data[task].items():
            rows.append([f"{label}, {int(length):,} tokens ({row['asked']} asked)", _percent(row.get("teacher")),
                         _percent(row.get("student")), _percent(row.get(bare)),
                         verdict(f"documents_{length}") if task == "documents" else ""])
    chat = data["chat"]
    rows.append([f"short chat questions right ({chat['questions']})", _percent(chat["teacher"]),
                 _percent(chat["student"]), "", verdict("chat")])
    rows.append(["greedy chat answers identical to the teacher's", "", _percent(chat["identical_answers"]), "", ""])
    for length, row in data["cache_bytes"].items():
        rows.append([f"cache MiB after {int(length):,} tokens", f"{row['teacher'] / 2**20:.1f}",
                     f"{row['student'] / 2**20:.2f} (1/{1 / row['fraction']:.0f})",
                     "" if row.get(bare) is None else f"{row[bare] / 2**20:.2f}",
                     verdict("cache_8192") if length == "8192" else ""])
    minutes = data["minutes"]
    rows.append(["minutes: fitting (convert, rank the layers, transcripts, transfer) / evaluation", "",
                 f"{minutes['fitting_total']:.1f} / {minutes['evaluation_total']:.1f}", "", verdict("fitting_minutes")])
    head = ["measure", "teacher", "student", "student, no sparse cache", "target"]
    if not any(row[3] for row in rows):  # no sparse cache: no such column
        head, rows = head[:3] + head[4:], [row[:3] + row[4:] for row in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    student = data["student"]
    kept = kept_layers(student)
    hybrid = f"layers {', '.join(map(str, kept))} softmax, the others " if kept else ""
    lora = data["transfer"].get("lora_rank", 0)
    source = (f"`docs/figures/{name}` ({data['teacher']}; student: {hybrid}{student['feature_map']} maps, window "
              f"{student['local_window']}, sparse cache {student['sparse_cache_size']}"
              f"{f', LoRA rank {lora}' if lora else ''}; {data['transfer']['device']}, "
              f"{data['threads']} threads, {data['date'][:10]})")
    return "\n".join(lines) + f"\n\nFrom {source}.\n"


def layer_ranking_table(name: str = "smollm2/layers.json", count: int = 8) -> str:
    """rank-layers on SmolLM2: the layers whose attention, made linear alone, costs the teacher most."""
    data = _load(name)
    lines = ["| rank | layer | answer log-prob change (nats) | KL to the teacher |", "|---|---|---|---|"]
    for rank, layer in enumerate(data["ranking"][:count], 1):
        score = data["scores"][str(layer)]
        lines.append(f"| {rank} | {layer} | {score['answer_delta']:+.2f} | {score['kl']:.3f} |")
    median = sorted(s["answer_delta"] for s in data["scores"].values())[len(data["scores"]) // 2]
    return ("\n".join(lines) + f"\n\nFrom `docs/figures/{name}` ({data['direction']}: the teacher with one layer given "
            f"the unfitted student's attention; {data['measured_on']}; the unchanged teacher's answer log-prob "
            f"{data['baseline']['answer_logprob']:.2f}; the median layer {median:+.2f}; {data['minutes']:.0f} minutes, "
            f"{data['date'][:10]}).\n")


def frontier_table(name: str = "smollm2/frontier.json") -> str:
    """The linearized chat model's frontier: one row per configuration, quality against cost."""
    data = _load(name)

    def ratio(value):
        return "" if value is None else f"{value:.2f}x"

    def mark(row, target, text):
        met = row["targets"].get(target)
        return text if met is None or not text else (f"**{text}**" if met else text)

    lengths = sorted({n for row in data["rows"] for n in row["documents"]}, key=int)
    contexts = sorted({n for row in data["rows"] for n in row["perplexity_ratio"]}, key=int)
    keys = sorted({n for row in data["rows"] for n in row.get("passkey", {})}, key=int)
    head = (["configuration", "kept softmax layers", "LoRA"] + [f"documents {int(n):,}" for n in lengths]
            + [f"pass key {int(n):,}" for n in keys] + [f"perplexity {int(n):,}" for n in contexts] + ["short chat", "cache 8,192", "decoding 8,192",
                                                               "fitting tokens / min", "budget, evaluation"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in data["rows"]:
        docs = [mark(row, f"documents_{n}", _percent((row["documents"].get(n) or {}).get("fraction"))) for n in lengths]
        ppl = [mark(row, f"perplexity_{n}", ratio(row["perplexity_ratio"].get(n))) for n in contexts]
        passkey = [_percent((row.get("passkey", {}).get(n) or {}).get("fraction")) for n in keys]
        cache = row.get("cache_fraction_8192")
        cells = ([row["name"], ", ".join(map(str, row["softmax_layers"])) or "none", str(row["lora_rank"] or "")]
                 + docs + passkey + ppl + [mark(row, "chat", _percent(row["chat"]["fraction"])),
                                 mark(row, "cache_8192", "" if cache is None else f"1/{1 / cache:.0f}"),
                                 mark(row, "decode_8192", ratio(row.get("decode_speedup_8192"))),
                                 mark(row, "fitting_minutes",
                                      f"{row['fitting']['tokens'] / 1e6:.2f}M / {row['fitting']['minutes']:.0f}"),
                                 f"{row['budget']:g}, {row['evaluation']}"])
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n".join(lines) + f"\n\nFrom `docs/figures/{name}` ({data['date'][:10]}); documents, pass keys and short chat as a "
            "fraction of the teacher's score, perplexity and cache as a ratio to the teacher's, decoding as the "
            "teacher's batch-1 ms per token over the student's; a target met in bold. "
            f"Recommended: {data['recommended']}"
            + ("" if any(all(r["targets"].values()) for r in data["rows"])
               else " (the closest: no row meets every target)") + ".\n")


def frontier_budget_table(name: str = "smollm2/frontier.json") -> str:
    """The recommended configuration at each budget it was fitted on, and what its fitting curve says
    each missed target would take."""
    data = _load(name)
    rows = budget_rows(data["rows"], data["recommended"])
    lengths = sorted({n for row in rows for n in row["documents"]}, key=int)
    contexts = sorted({n for row in rows for n in row["perplexity_ratio"]}, key=int)
    head = (["configuration", "budget, evaluation", "fitting tokens", "fitting minutes"]
            + [f"documents {int(n):,}" for n in lengths] + [f"perplexity {int(n):,}" for n in contexts])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(
            [row["name"], f"{row['budget']:g}, {row['evaluation']}", f"{row['fitting']['tokens'] / 1e6:.2f}M",
             f"{row['fitting']['minutes']:.0f}"]
            + [_percent((row["documents"].get(n) or {}).get("fraction")) for n in lengths]
            + ["" if row["perplexity_ratio"].get(n) is None else f"{row['perplexity_ratio'][n]:.2f}x"
               for n in contexts]) + " |")
    best = next(row for row in data["rows"] if row["name"] == data["recommended"])
    needed = best.get("tokens_needed") or {}
    notes = needed.get("notes", {})
    text = []
    for key, note in notes.items():
        tokens = needed.get(key)
        measure, length = key.rsplit("_", 1)
        label = f"{measure} at {int(length):,} tokens"
        if tokens is None:
            text.append(f"{label}: {note}")
        else:
            minutes = needed.get(f"{key}_minutes")
            shown = None if minutes is None else (f"{minutes:.0f} minutes" if minutes < 120 else f"{minutes / 60:.1f} hours")
            at = "" if shown is None else f", {shown} of transfer at this run's speed"
            text.append(f"{label}: {tokens / 1e6:,.1f}M tokens{at} ({note})")
    return ("\n".join(lines) + f"\n\nFrom `docs/figures/{name}`. The fitting curve of {best['name']} extended "
            "(a rough extrapolation): " + ("; ".join(text) or "not measured") + ".\n")


TABLES = {"chat": chat_table, "chat_decode": chat_decode_table, "chat_prefill": chat_prefill_table,
          "serving": serving_table, "attention": attention_table, "attention_performer_pytorch": performer_pytorch_table,
          "decoding": decoding_table, "training": training_table, "memory": memory_table,
          "recall": recall_table, "recall_linearized": recall_linearized_table, "chat_lm": chat_lm_table,
          "decay_recall": decay_recall_table, "decay_cost": decay_cost_table,
          "serving_batching": serving_batching_table, "layer_ranking": layer_ranking_table,
          "frontier": frontier_table, "frontier_budget": frontier_budget_table}
