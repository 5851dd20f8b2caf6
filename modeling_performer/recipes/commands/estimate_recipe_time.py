"""How long the recipe's causal-LM steps take for a 1B Llama, estimated from shallower copies.

The recipe (scripts/convert_recipe.sh, stage causal-lm) linearizes a Llama-architecture teacher:
attention transfer layer by layer (200 steps of one 2,048-token window), end to end (60 steps),
then LoRA (rank 16, 200 steps of 2 x 2,048 tokens), for each linear student. Its bundled teacher is
tiny; this script says what the same steps cost for a model of Llama 3.2 1B's shape (hidden 2048,
32 query heads sharing 8 key/value heads, MLP 8192, vocabulary 128,256, 16 layers; 1.24B
parameters) on this machine's device, without needing such a model or the memory for all of it.

It builds random Llama checkpoints of that exact width with fewer layers (--layers, default 1 and
2), converts each through the Llama path (the softmax teacher and the Hedgehog + window student),
and times one step of each kind with the library's own calls (`transfer_attention`, `add_lora`
and an AdamW step), after a warm-up step. Every layer of a Llama is the same, so a step's time
is a + b x layers: the two depths give a (embeddings, LM head, the step's fixed work) and b
(one layer), and the estimate is a + b x 16. --check-layers 16 also measures the full depth, to
see the estimate against the real thing where the device has room for it.

    python scripts/estimate_recipe_time.py                         # this machine's device
    python scripts/estimate_recipe_time.py --device cpu --steps 2 --check-layers 4 \\
        --output docs/figures/recipe/time_1b_cpu.json              # the README's CPU numbers
    python scripts/estimate_recipe_time.py --device cuda --check-layers 16 \\
        --output docs/figures/recipe/time_1b_cuda.json

Not counted: conversion (disk speed) and evaluation (it depends on the validation text).
"""

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import torch

from modeling_performer.recipes import devices
from modeling_performer.recipes.bench_common import provenance, synchronize
from modeling_performer.transfer import RECIPE_SETTINGS

from modeling_performer.recipes import ROOT  # the repository the command runs in

# Llama 3.2 1B's shape (its config.json); only the depth changes between the measured models.
TARGET_SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
                "num_hidden_layers": 16}
# What the recipe's causal-LM stage runs per linear student (scripts/convert_recipe.sh: its transfer
# and LoRA lines; the end-to-end steps are RECIPE_SETTINGS').
RECIPE_STEPS = {"layer_by_layer": {"steps": 200, "batch_size": 1},
                "end_to_end": {"steps": RECIPE_SETTINGS["end_to_end_steps"], "batch_size": 1},
                "lora": {"steps": 200, "batch_size": 2}}


def llama_folder(folder: pathlib.Path, shape: dict, layers: int, seq_len: int) -> pathlib.Path:
    """A random LlamaForCausalLM of `shape` with `layers` layers, saved with the bundled tokenizer
    (the token ids are drawn at random: the tokenizer only has to load)."""
    import transformers

    config = transformers.LlamaConfig(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=seq_len,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(ROOT / "configuration" / "tokenizer").save_pretrained(folder)
    del model
    return folder


def _step_seconds(stamps: list) -> float:
    """The median time between consecutive steps, the first step (the warm-up) left out."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][1:]
    return statistics.median(gaps)


def measure(layers: int, shape: dict, args, device, precision) -> dict:
    """Seconds per step of each kind (and peak memory on CUDA) for the model with `layers` layers."""
    from modeling_performer.conversion import convert_to_performer
    from modeling_performer.lora import add_lora
    from modeling_performer.transfer import transfer_attention

    autocast = lambda: devices.autocast(device, precision)  # noqa: E731
    result = {"layers": layers}
    with tempfile.TemporaryDirectory() as tmp:
        source = llama_folder(pathlib.Path(tmp) / "llama", shape, layers, args.seq_len)
        teacher, _ = convert_to_performer(source, "softmax")
        student, _ = convert_to_performer(source, "favor", feature_map="hedgehog", local_window=args.window)
    teacher.to(device)
    student.to(device)
    result["parameters"] = sum(p.numel() for p in teacher.parameters())
    generator = torch.Generator().manual_seed(0)

    def tokens(batch_size):
        ids = torch.randint(0, shape["vocab_size"], (batch_size, args.seq_len), generator=generator)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}

    runs = args.steps + 2  # a warm-up step, the timed ones, and the stamp after the last
    for kind in ("layer_by_layer", "end_to_end"):
        stamps, batch_size = [], RECIPE_STEPS[kind]["batch_size"]

        def get_batch(step, stamps=stamps, batch_size=batch_size):
            synchronize(device)
            stamps.append(time.perf_counter())
            return tokens(batch_size)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lbl = kind == "layer_by_layer"
        # get_batch is called once per step: the last call's stamp closes the last timed step
        transfer_attention(teacher, student, get_batch, steps=runs if lbl else 0, end_to_end_steps=0 if lbl else runs,
                           learning_rate=RECIPE_SETTINGS["learning_rate"], progress=False, autocast=autocast)
        result[kind] = {"seconds_per_step": _step_seconds(stamps[:runs])}
        if device.type == "cuda":
            result[kind]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del teacher
    model = add_lora(student, rank=16)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = []
    for _ in range(runs):
        synchronize(device)
        stamps.append(time.perf_counter())
        batch = tokens(RECIPE_STEPS["lora"]["batch_size"])
        with autocast():
            loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result["lora"] = {"seconds_per_step": _step_seconds(stamps)}
    if device.type == "cuda":
        result["lora"]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer
    return result


def fit_and_estimate(points: list, target_layers: int) -> dict:
    """Per step kind: seconds = a + b x layers, fitted by least squares to the measured points;
    the estimate at target_layers and, for the recipe's step counts, the minutes per student."""
    xs = [p["layers"] for p in points]
    if len(set(xs)) < 2:
        raise SystemExit("--layers needs at least two different depths to separate the per-layer time")
    mean_x = statistics.fmean(xs)
    estimate, minutes = {}, 0.0
    for kind, recipe in RECIPE_STEPS.items():
        ys = [p[kind]["seconds_per_step"] for p in points]
        mean_y = statistics.fmean(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        fixed = mean_y - slope * mean_x
        seconds = fixed + slope * target_layers
        estimate[kind] = {"fixed_seconds": fixed, "seconds_per_layer": slope, "seconds_per_step": seconds,
                          "steps": recipe["steps"], "minutes": seconds * recipe["steps"] / 60}
        minutes += estimate[kind]["minutes"]
    estimate["minutes_per_student"] = minutes
    return estimate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="depths measured (%(default)s)")
    parser.add_argument("--check-layers", type=int, nargs="*", default=[],
                        help="depths also measured, to compare with the estimate (e.g. 16: the full model)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per window (the recipe's: %(default)s)")
    parser.add_argument("--window", type=int, default=64, help="the student's exact local window (%(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps of each kind, after a warm-up (%(default)s)")
    parser.add_argument("--shape", type=json.loads, default={},
                        help="JSON changes to the 1B shape (a smaller one for a quick try)")
    parser.add_argument("--output", type=pathlib.Path, help="result file (default: outputs/bench/recipe_time.json)")
    devices.add_device_arguments(parser, training=False, checkpointing=False)
    args = parser.parse_args(argv)
    shape = {**TARGET_SHAPE, **args.shape}
    unknown = sorted(set(args.shape) - set(TARGET_SHAPE))
    if unknown:
        raise SystemExit(f"--shape: unknown keys {unknown} (known: {sorted(TARGET_SHAPE)})")
    if args.steps < 1 or min(args.layers + args.check_layers) < 1:
        raise SystemExit("--steps and every depth must be at least 1")
    device, precision = devices.setup(args)
    output = args.output or ROOT / "outputs" / "bench" / "recipe_time.json"

    points = []
    for layers in sorted(set(args.layers)):
        points.append(measure(layers, shape, args, device, precision))
        print(json.dumps(points[-1]), flush=True)
    estimate = fit_and_estimate(points, shape["num_hidden_layers"])
    checks = []
    for layers in args.check_layers:
        measured = measure(layers, shape, args, device, precision)
        fit = fit_and_estimate(points, layers)
        checks.append({**measured, "estimated_over_measured": {
            kind: fit[kind]["seconds_per_step"] / measured[kind]["seconds_per_step"] for kind in RECIPE_STEPS}})
        print(json.dumps(checks[-1]), flush=True)
    record = {"settings": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
              **provenance(), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "precision": precision, "torch_threads": torch.get_num_threads(), "shape": shape,
              "recipe_steps": RECIPE_STEPS, "measured": points, "estimate": estimate, "checks": checks}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1))
    per_student = estimate["minutes_per_student"]
    print(f"{shape['num_hidden_layers']}-layer model on {device} ({precision}): "
          + ", ".join(f"{kind} {estimate[kind]['seconds_per_step']:.2f} s/step" for kind in RECIPE_STEPS)
          + f"; the recipe's transfer + LoRA {per_student:.1f} minutes per student; wrote {output}")
    return record


if __name__ == "__main__":
    main()
