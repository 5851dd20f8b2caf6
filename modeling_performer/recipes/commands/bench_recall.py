"""Multi-query associative recall (MQAR; "Zoology", Arora et al. 2023): which attention can look
up a value by its key, trained from scratch on the sequences modeling_performer.recipes.recall
generates (the task and the curriculum are described there).

    python scripts/bench_recall.py                       # the table: softmax, then each linear attention, two shapes
    python scripts/bench_recall.py --attention favor --feature-map hedgehog --local-window 8 \\
        --seq-len 128 --pairs 8 --output outputs/bench/one.json   # one model, {"accuracy": ...}
    python scripts/bench_recall.py --full                # zoology's grid (widths 64-512; a GPU)

The table counts only where the softmax model reaches >= 99%: below that the task, not the
attention, is what failed. Linearized models, the pass-key task and the decoding cost of the sparse
cache: scripts/recall_experiments.py.
"""

import argparse
import json
import sys
import time

import torch

from modeling_performer import PerformerForCausalLM
from modeling_performer.recipes.bench_common import add_output_arguments, save_and_draw
from modeling_performer.recipes.devices import resolve_device
from modeling_performer.recipes.recall import add_task_arguments, kept_folder, shape_argument, write_record
from modeling_performer.recipes.recall_training import accuracy, model_config, train

# The table: (sequence length, pairs) as zoology's first shapes; --full adds (256, 16) and its widths.
SHAPES = [(64, 4), (128, 8)]
FULL_SHAPES = SHAPES + [(256, 16)]
FULL_WIDTHS = [64, 128, 256, 512]
# The table's models: name -> (attention, feature map, window, features, linear decay); the window
# is shorter than every key-to-query distance (the queries start --gap tokens after the last pair).
TABLE_WINDOW = 8
MODELS = {
    "softmax": ("softmax", "softmax", 0, 64, "none"),
    "FAVOR+ M=64": ("favor", "softmax", 0, 64, "none"),
    "FAVOR+ M=256": ("favor", "softmax", 0, 256, "none"),
    "ReLU M=64": ("favor", "relu", 0, 64, "none"),
    "Hedgehog": ("favor", "hedgehog", 0, 64, "none"),
    f"Hedgehog + W{TABLE_WINDOW}": ("favor", "hedgehog", TABLE_WINDOW, 64, "none"),
    "Hedgehog + decay (head)": ("favor", "hedgehog", 0, 64, "head"),
    "Hedgehog + decay (data)": ("favor", "hedgehog", 0, 64, "data"),
    f"Hedgehog + W{TABLE_WINDOW} + decay (data)": ("favor", "hedgehog", TABLE_WINDOW, 64, "data"),
}


# The slowest on a CPU (twice FAVOR+ M=64 per step, and no better at recall there): in the table
# with --full, or when --models names it.
FULL_ONLY = ("FAVOR+ M=256",)


def run_one(args, device, attention, feature_map, window, features, sparse, decay=None) -> dict:
    torch.manual_seed(args.seed)
    config = model_config(args, attention, feature_map, window, features, sparse, decay=decay)
    model = PerformerForCausalLM(config).to(device)
    record = train(model, args, device)
    record["accuracy"] = accuracy(model, args, device, args.pairs, args.seq_len)
    for size in args.score_sparse_cache:
        model.set_sparse_cache_size(size)  # a switch at inference: the same trained weights
        record.setdefault("sparse_cache_accuracy", {})[size] = accuracy(model, args, device, args.pairs, args.seq_len)
    return record


def table(args) -> list:
    """Every model of MODELS at every shape, each in its own process (--jobs at a time), each
    result kept in outputs/bench/recall-<settings>/ as it finishes: a killed run starts again where
    it stopped. Softmax trains first: the steps it takes to solve a shape are every other model's
    budget at that shape (the same training for all; at most --steps). The Hedgehog + window models
    are also scored with a sparse cache of 2 x pairs (the same weights, switched on at inference)."""
    import concurrent.futures
    import subprocess

    shapes = args.shapes or (FULL_SHAPES if args.full else SHAPES)
    names = args.models or [name for name in MODELS if args.full or name not in FULL_ONLY]
    widths = FULL_WIDTHS if args.full else [args.hidden]
    # Finished models are kept per setting (a killed table resumes; other settings start afresh).
    folder = kept_folder(args, "recall", ignored=("jobs", "models", "shapes", "full"))  # files name those
    folder.mkdir(parents=True, exist_ok=True)

    def job(name, width, seq_len, pairs, steps):
        attention, feature_map, window, features, decay = MODELS[name]
        out = folder / f"{name.replace(' ', '').replace('+', 'p').replace('=', '')}-d{width}-T{seq_len}-P{pairs}.json"
        cmd = [sys.executable, sys.argv[0], "--attention", attention, "--feature-map", feature_map,
               "--local-window", str(window), "--features", str(features), "--seq-len", str(seq_len),
               "--pairs", str(pairs), "--hidden", str(width), "--output", str(out), "--threads",
               str(args.threads or 1), "--seed", str(args.seed), "--steps", str(steps),
               "--heads", str(args.heads), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
               "--vocab", str(args.vocab), "--gap", str(args.gap), "--device", args.device,
               "--curriculum", str(args.curriculum), "--curriculum-length", str(args.curriculum_length),
               "--weight-decay", str(args.weight_decay), "--eval-batches", str(args.eval_batches),
               "--linear-decay", decay]
        if window and decay == "none":  # (the sparse cache is defined for an additive state only)
            cmd += ["--score-sparse-cache", str(2 * pairs)]
        return name, (width, seq_len, pairs), out, cmd

    def run(job):
        name, (width, seq_len, pairs), out, cmd = job
        if not out.exists():
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} T={seq_len} pairs={pairs} failed:\n{done.stderr[-2000:]}")
        return job, json.loads(out.read_text())

    grid = [(width, seq_len, pairs) for width in widths for seq_len, pairs in shapes]
    rows = []

    def collect(finished):
        for (name, (width, seq_len, pairs), _, _), record in finished:
            common = {"width": width, "seq_len": seq_len, "pairs": pairs, "train_seconds": record["train_seconds"],
                      "steps_run": record["steps_run"]}
            rows.append({"model": name, **common, "accuracy": record["accuracy"]})
            print(f"{name:28s} d={width} T={seq_len:4d} pairs={pairs:3d}  accuracy {record['accuracy']:.4f}  "
                  f"({record['train_seconds']:.0f} s, {record['steps_run']} steps)", flush=True)
            for size, value in record.get("sparse_cache_accuracy", {}).items():
                rows.append({"model": f"{name} + sparse 2P (same weights)", **common, "sparse_cache_size": int(size),
                             "accuracy": value})

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        collect(pool.map(run, [job("softmax", *shape, args.steps) for shape in grid]))
        budget = {(r["width"], r["seq_len"], r["pairs"]): r["steps_run"] for r in rows}
        collect(pool.map(run, [job(name, *shape, budget[shape]) for shape in grid
                               for name in names if name != "softmax"]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=["softmax", "favor"], help="one model only (default: the table)")
    add_task_arguments(parser)
    parser.add_argument("--full", action="store_true", help="zoology's grid of widths 64-512 (meant for a GPU)")
    parser.add_argument("--jobs", type=int, default=2, help="models trained at once by the table")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        help="the table: only these models (default: all but " + ", ".join(FULL_ONLY) +
                             ", which --full adds)")
    parser.add_argument("--shapes", nargs="+", type=shape_argument, metavar="T:PAIRS",
                        help="the table: only these shapes (default: " + " ".join(f"{t}:{p}" for t, p in SHAPES) + ")")
    parser.add_argument("--score-sparse-cache", type=int, nargs="*", default=[],
                        help="one model: also score it with these sparse cache sizes (same weights)")
    add_output_arguments(parser, "recall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.attention:
        record = run_one(args, device, args.attention, args.feature_map, args.local_window, args.features,
                         args.sparse_cache_size, None if args.linear_decay == "none" else args.linear_decay)
        print(f"accuracy {record['accuracy']:.4f}; wrote {write_record(args, 'recall_one', record)}")
        return
    if args.models and "softmax" not in args.models:
        raise SystemExit("the table needs the softmax model: it decides which shapes count")
    start = time.perf_counter()
    rows = table(args)
    softmax = {(r["width"], r["seq_len"], r["pairs"]): r["accuracy"] for r in rows if r["model"] == "softmax"}
    counted = {shape: value >= 0.99 for shape, value in softmax.items()}
    for row in rows:
        row["softmax_solved"] = counted[(row["width"], row["seq_len"], row["pairs"])]
    save_and_draw("recall", args, {"results": rows, "softmax_solved": {f"d{w}-T{t}-P{p}": ok for (w, t, p), ok
                                                                        in counted.items()},
                                   # this run's wall time (models kept from a killed run are not retrained)
                                   "table_seconds": round(time.perf_counter() - start)})


if __name__ == "__main__":
    main()
