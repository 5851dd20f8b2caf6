"""Prints the results tables of scripts/convert_recipe.sh (markdown) from its output folder, and
writes them to FOLDER/results.md, with every number behind them in FOLDER/results.json (the
measurements, the minutes, the date and the commit). Cells of steps that have not run yet are left
empty.

    python scripts/recipe_report.py outputs/recipe --window 64
"""

import argparse
import json
import pathlib

from modeling_performer.recipes import ROOT


def load(path: pathlib.Path):
    return json.loads(path.read_text()) if path.exists() else {}


def minutes(folder: pathlib.Path) -> dict:
    path = folder / "minutes.tsv"
    table = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, value = line.split("\t")[:2]
            table[name] = table.get(name, 0.0) + float(value.split()[0])
    return table


def report(folder: pathlib.Path, window: int) -> str:
    hh, hhw = "hedgehog-transferred", f"hedgehog-w{window}-transferred"
    embeddings = {tokens: load(folder / f"embeddings-{tokens}.json") for tokens in (256, 512)}
    lm = load(folder / "clm-eval.json")
    rt = {name: load(folder / f"rt-{name}" / "metrics.json")
          for name in ("softmax-full", "hedgehog-lora", f"hedgehog-w{window}-lora")}
    spent = minutes(folder)

    def cosines(model):
        """Mean / p5 cosine cells at 256 and 512 tokens."""
        cells = []
        for tokens in (256, 512):
            row = embeddings[tokens].get(str(folder / model))
            cells.append(f"{row['mean_cosine']:.4f} / {row['p5_cosine']:.4f}" if row else "")
        return cells

    teacher_lm = lm.get(str(folder / "clm-teacher"), {})

    def lm_cells(model):
        """Perplexity at 512, 2,048 and 8,192 tokens; cache after 2,048 / 8,192 tokens, and its share of the
        teacher's KV cache at 8,192."""
        row = lm.get(str(folder / model), {})

        def cell(key, digits=1):
            return f"{row[key]:.{digits}f}" if key in row else ""

        share = ""
        if "cache_mib_8192" in row and teacher_lm.get("cache_mib_8192"):
            share = f"1/{teacher_lm['cache_mib_8192'] / row['cache_mib_8192']:.0f}" if model != "clm-teacher" else "1"
        return [cell("perplexity_512"), cell("perplexity_2048"), cell("perplexity_8192"),
                cell("cache_mib_2048", 2) + " / " + cell("cache_mib_8192", 2), share]

    def accuracy(name, how):
        return f"{rt[name]['test_accuracy']:.4f} ({how})" if "test_accuracy" in rt[name] else ""

    def cost(*names):
        total = sum(spent.get(n, 0.0) for n in names)
        return f"{total:.1f}" if any(n in spent for n in names) else ""

    def table(header, rows):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]

    lora = f"hedgehog-w{window}-lora"
    encoder_rows = [
        ["softmax (exact conversion)", "1 / 1", "1 / 1", accuracy("softmax-full", "full FT"),
         cost("convert-minilm-softmax-cls", "rt-softmax-full")],
        ["FAVOR+ swapped in, no training", *cosines("minilm-favor"), "", cost("convert-minilm-favor")],
        ["Hedgehog + transfer (+ LoRA)", *cosines(f"minilm-{hh}"), accuracy("hedgehog-lora", "LoRA"),
         cost(f"transfer-minilm-{hh}", "rt-hedgehog-lora")],
        [f"Hedgehog + window {window} + transfer (+ LoRA)", *cosines(f"minilm-{hhw}"), accuracy(lora, "LoRA"),
         cost(f"transfer-minilm-{hhw}", f"rt-{lora}")],
    ]
    lm_rows = [
        ["Llama teacher (softmax, trained here)", *lm_cells("clm-teacher"), cost("clm-teacher")],
        ["FAVOR+ swapped in, no training", *lm_cells("clm-favor"), cost("convert-clm-favor")],
        ["Hedgehog + transfer", *lm_cells(f"clm-{hh}"), cost(f"transfer-clm-{hh}")],
        ["Hedgehog + transfer + LoRA", *lm_cells("clm-hedgehog-lora"), cost("clm-hedgehog-lora")],
        [f"Hedgehog + window {window} + transfer", *lm_cells(f"clm-{hhw}"), cost(f"transfer-clm-{hhw}")],
        [f"Hedgehog + window {window} + transfer + LoRA", *lm_cells(f"clm-{lora}"), cost(f"clm-{lora}")],
    ]
    lines = table(["MiniLM / Rotten Tomatoes", "cosine, 256-token passages (mean / p5)", "512 (mean / p5)",
                   "Rotten Tomatoes test accuracy", "CPU minutes"], encoder_rows)
    lines.append("")
    lines += table(["causal LM", "perplexity at 512", "at 2,048", "at 8,192", "cache MiB after 2,048 / 8,192 tokens",
                    "cache vs teacher at 8,192", "CPU minutes"], lm_rows)
    lines.append("")
    lines.append(f"Total recorded: {sum(spent.values()):.1f} minutes ({', '.join(f'{k} {v:.1f}' for k, v in spent.items())})")
    return "\n".join(lines)


def measurements(folder: pathlib.Path, window: int) -> dict:
    """Everything the tables are made of, keyed by the step that measured it (paths relative to FOLDER)."""
    import datetime
    import subprocess

    def relative(table):
        return {pathlib.Path(k).name if k.startswith(str(folder)) else k: v for k, v in table.items()}

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    teacher = load(folder / "clm-teacher" / "metrics.json")
    return {
        "date": datetime.date.today().isoformat(), "commit": commit or None, "window": window,
        "embeddings": {tokens: relative(load(folder / f"embeddings-{tokens}.json")) for tokens in (256, 512)},
        "rotten_tomatoes": {name: {k: v for k, v in load(folder / f"rt-{name}" / "metrics.json").items()
                                   if k.startswith("test_")}
                            for name in ("softmax-full", "hedgehog-lora", f"hedgehog-w{window}-lora")},
        "causal_lm": relative(load(folder / "clm-eval.json")),
        "causal_lm_teacher": {k: v for k, v in teacher.items() if k != "train_loss_history"},
        "minutes": minutes(folder),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.folder)
    text = report(folder, args.window)
    (folder / "results.md").write_text(text + "\n")
    (folder / "results.json").write_text(json.dumps(measurements(folder, args.window), indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
