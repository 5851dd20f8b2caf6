"""Draws the benchmark figures from their result files (no measuring): attention time and memory
vs T, decode latency and cache size vs context, serving throughput vs batch, training tokens/s vs
T. Without arguments, redraws every committed figure in docs/figures from the JSON beside it.

    python scripts/plot_benchmarks.py
"""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import ROOT

FIGURES = ROOT / "docs" / "figures"


def _log_axes(ax, xlabel, ylabel):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_attention(results: dict, path: pathlib.Path):
    """results: {T: {method: {"seconds", "peak_bytes"} or {"error"}}} (bench_attention.py --json)."""
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    methods = sorted({m for row in results.values() for m in row})
    for method in methods:
        points = sorted((int(t), row[method]) for t, row in results.items() if "seconds" in row.get(method, {}))
        if points:
            speed.plot([t for t, _ in points], [r["seconds"] for _, r in points], marker="o", label=method)
            memory.plot([t for t, _ in points], [r["peak_bytes"] / 2**20 for _, r in points], marker="o", label=method)
    _log_axes(speed, "sequence length T", "seconds (forward + backward)")
    _log_axes(memory, "sequence length T", "peak extra memory (MiB)")
    fig.suptitle("One attention layer, B=1 H=8 D=64 M=256, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_decoding(rows: list, path: pathlib.Path):
    """rows: [{"context", "performer_ms", "gpt2_ms", "performer_cache_mib", "gpt2_cache_mib"}]."""
    rows = sorted(rows, key=lambda r: r["context"])
    contexts = [r["context"] for r in rows]
    fig, (latency, cache) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((latency, "ms", "ms per decoded token (batch 1)"), (cache, "cache_mib", "cache (MiB)")):
        ax.plot(contexts, [r[f"performer_{key}"] for r in rows], marker="o", label="Performer FAVOR+")
        ax.plot(contexts, [r[f"gpt2_{key}"] for r in rows], marker="o", label="GPT-2 (SDPA, KV cache)")
        _log_axes(ax, "context (tokens already seen)", label)
    fig.suptitle("Decoding one token at a time, 6 layers, hidden 512, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_chat_decode(data: dict, path: pathlib.Path):
    """data: bench_chat.py's results, rows [{"kind", "mode", "batch", "context", "ms_per_token", "prefill_s"?}]."""
    rows = data["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5.5 * (len(batches) + 1), 4))
    labels = {"student": "linearized (Hedgehog + window)", "teacher": "teacher (Llama, KV cache)",
              "student_decay": "linearized + decay gate"}
    kinds = [kind for kind in labels if any(r["kind"] == kind for r in rows)]
    for ax, batch in zip(axes, batches):
        for kind in kinds:
            for mode, style in (("eager", "-"), ("compiled", "--")):
                points = sorted((r["context"], r["ms_per_token"]) for r in rows
                                if r["kind"] == kind and r["mode"] == mode and r["batch"] == batch)
                if points:
                    ax.plot(*zip(*points), style, marker="o", label=f"{labels[kind]}, {mode}")
        ax.set_title(f"decoding, batch {batch}")
        _log_axes(ax, "context (tokens)", "ms per decoding step")
    prefill = axes[-1]
    for kind in kinds:
        points = sorted((r["context"], r["prefill_s"]) for r in rows
                        if r["kind"] == kind and r["mode"] == "eager" and "prefill_s" in r)
        if points:
            prefill.plot(*zip(*points), marker="o", label=labels[kind])
    prefill.set_title("prefill, batch 1")
    _log_axes(prefill, "prompt length (tokens)", "seconds")
    settings = data.get("settings", {})
    fig.suptitle(f"SmolLM2-135M shape (30 layers, 9/3 heads), {data.get('device_name', 'cpu')}, "
                 f"{settings.get('dtype', 'float32')}, teacher weights: {data.get('weights', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_serving(results: list, path: pathlib.Path):
    labels = {"performer": "Performer FAVOR+", "performer-window": "Performer Hedgehog + window",
              "gpt2": "GPT-2 (SDPA, KV cache)"}
    contexts = sorted({r["context"] for r in results})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for kind, label in labels.items():
            rows = sorted((r for r in results if r["kind"] == kind and r["context"] == context), key=lambda r: r["batch"])
            if rows:
                ax.plot([r["batch"] for r in rows], [r["decode_tokens_per_s"] for r in rows], marker="o", label=label)
        ax.set_title(f"context {context} tokens")
        _log_axes(ax, "batch (prompts decoded together)", "decoded tokens / s")
    fig.suptitle("Serving throughput, 6 layers, hidden 512, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_training(results: list, path: pathlib.Path):
    labels = {"performer": "Performer FAVOR+", "performer-window": "Performer Hedgehog + window",
              "softmax": "same stack, softmax (SDPA)", "gpt2": "GPT-2 (SDPA)"}
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, label in labels.items():
        rows = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["length"])
        if rows:
            speed.plot([r["length"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=label)
            memory.plot([r["length"] for r in rows], [r["peak_rss_mib"] for r in rows], marker="o", label=label)
    _log_axes(speed, "context length T (batch 1)", "training tokens / s (forward + backward)")
    _log_axes(memory, "context length T (batch 1)", "peak resident memory (MiB)")
    fig.suptitle("Training a 6-layer causal LM, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_recall(results: list, path: pathlib.Path):
    """results: [{"model", "seq_len", "pairs", "accuracy"}] (bench_recall.py): answer accuracy per shape."""
    shapes = sorted({(r["seq_len"], r["pairs"]) for r in results})
    fig, ax = plt.subplots(figsize=(7, 4))
    for model in dict.fromkeys(r["model"] for r in results):
        rows = {(r["seq_len"], r["pairs"]): r["accuracy"] for r in results if r["model"] == model}
        ax.plot(range(len(shapes)), [rows.get(shape, float("nan")) for shape in shapes], marker="o", label=model)
    ax.set_xticks(range(len(shapes)), [f"T={t}, {p} pairs" for t, p in shapes])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("answer accuracy (held-out sequences)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Multi-query associative recall, 2-layer models trained from scratch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_sparse_cache(results: dict, path: pathlib.Path):
    """results: {model: [{"tokens", "cache_bytes", "ms_per_token"}]} (bench_recall.py --decoding)."""
    fig, (latency, cache) = plt.subplots(1, 2, figsize=(11, 4))
    for model, points in results.items():
        tokens = [p["tokens"] for p in points]
        latency.plot(tokens, [p["ms_per_token"] for p in points], marker="o", label=model)
        cache.plot(tokens, [p["cache_bytes"] / 2**20 for p in points], marker="o", label=model)
    _log_axes(latency, "tokens decoded", "ms per decoded token (batch 1)")
    _log_axes(cache, "tokens decoded", "cache (MiB)")
    fig.suptitle("Decoding with a sparse cache, 4 layers, hidden 256, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_chat_lm(results: dict, path: pathlib.Path):
    """The chat-lm recipe (chat_lm.py report): quality against transfer tokens, and document questions
    by length for the teacher and the student with and without its sparse cache."""
    fig, (ppl, curve, docs) = plt.subplots(1, 3, figsize=(15, 4))
    points = [p for p in results["curve"] if p.get("ppl_2048") is not None]
    tokens = [p["tokens"] / 1e3 for p in points]
    ppl.plot(tokens, [p["ppl_2048"] for p in points], marker="o", label="student")
    teacher = results.get("curve_teacher", {}).get("ppl_2048")
    if teacher:
        ppl.axhline(teacher, color="k", linestyle="--", label="teacher")
        ppl.axhline(teacher * 1.05, color="grey", linestyle=":", label="target (teacher + 5%)")
    ppl.set_yscale("log")
    ppl.set(xlabel="transfer tokens (thousands)", ylabel="perplexity at 2,048 tokens")
    for length in sorted({n for p in points for n in p["documents"]}, key=int):
        curve.plot(tokens, [p["documents"].get(length) for p in points], marker="o", label=f"{length} tokens")
        row = results["documents"].get(length, {})
        if row.get("teacher") is not None:
            curve.axhline(row["teacher"] * 0.9, linestyle=":", alpha=0.5, color=curve.lines[-1].get_color(),
                          label=f"target at {length} (90% of the teacher)")
    curve.set(xlabel="transfer tokens (thousands)", ylabel="document questions right (student)", ylim=(-0.05, 1.05))
    lengths = list(results["documents"])
    for offset, run in enumerate(("teacher", "student", "student_without_sparse_cache")):
        values = [results["documents"][n].get(run) for n in lengths]
        if any(v is not None for v in values):
            docs.bar([i + (offset - 1) * 0.27 for i in range(len(lengths))], [v or 0 for v in values], width=0.27,
                     label=run.replace("_", " "))
    docs.set_xticks(range(len(lengths)), lengths)
    docs.set(xlabel="document tokens", ylabel="questions right", ylim=(0, 1.05))
    for ax in (ppl, curve, docs):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['teacher']} linearized: {results['student_dir']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PLOTS = {
    "attention": (plot_attention, lambda data: data.get("results", data)),
    "decoding": (plot_decoding, lambda data: data["rows"]),
    "serving": (plot_serving, lambda data: data["results"]),
    "chat_decode": (plot_chat_decode, lambda data: data),
    "chat_decode_gpu": (plot_chat_decode, lambda data: data),
    "training": (plot_training, lambda data: data["results"]),
    "recall": (plot_recall, lambda data: data["results"]),
    "sparse_cache": (plot_sparse_cache, lambda data: data["decoding"]),
    "smollm2/results": (plot_chat_lm, lambda data: data),
}


def redraw(name: str, source=None) -> pathlib.Path:
    """Draws figure `name` from its JSON (default docs/figures/<name>.json) into a PNG beside it."""
    source = pathlib.Path(source) if source is not None else FIGURES / f"{name}.json"
    draw, select = PLOTS[name]
    path = source.with_suffix(".png")
    draw(select(json.loads(source.read_text())), path)
    plt.close("all")
    return path


def main():
    for name in PLOTS:
        if (FIGURES / f"{name}.json").exists():
            print(f"wrote {redraw(name)}")
        else:
            print(f"{name}: no {name}.json yet (run the benchmark that writes it)")


if __name__ == "__main__":
    main()


def plot_frontier(record: dict, path: pathlib.Path):
    """The frontier (chat_lm.py frontier): document questions against the cache each row keeps at
    8,192 tokens, and against the perplexity ratio at 2,048 tokens; one point per row."""
    from .frontier import mean_document_fraction

    fig, (cache, ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for row in record["rows"]:
        score = mean_document_fraction(row)
        if score is None:
            continue
        label = row["name"] + ("" if row["evaluation"] == "full" else " (screening)")
        if row.get("cache_fraction_8192") is not None:
            cache.scatter(row["cache_fraction_8192"], score, label=label)
        if row["perplexity_ratio"].get("2048") is not None:
            ppl.scatter(row["perplexity_ratio"]["2048"], score, label=label)
    cache.axvline(1 / 8, color="grey", linestyle=":", label="cache target (1/8)")
    cache.set(xlabel="cache at 8,192 tokens / the teacher's", ylabel="document questions, fraction of the teacher's")
    ppl.axvline(1.05, color="grey", linestyle=":", label="perplexity target (1.05x)")
    ppl.set(xlabel="perplexity / the teacher's, 2,048 tokens", ylabel="document questions, fraction of the teacher's")
    for ax in (cache, ppl):
        ax.axhline(0.9, color="k", linestyle="--", alpha=0.4)
        ax.set_ylim(-0.05, 1.1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Linearized SmolLM2-135M-Instruct: what each configuration keeps and costs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
