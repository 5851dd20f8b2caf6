"""One GPU run, about 5 minutes: the fast path checked against the PyTorch path, then timed.

1. correctness: causal linear attention (FAVOR+, ReLU, Hedgehog, Hedgehog + window, and FAVOR+,
   Hedgehog and Hedgehog + window with a decay gate) on the Triton fast path against the PyTorch
   kernels, forward and backward (the gates' gradient too), fp32 and bf16, left padding;
2. kernels: one attention layer forward + backward in bf16, B=1, H=8, D=64 (FAVOR+ M=256,
   Hedgehog F=64), causal at 4k, 16k, 64k and non-causal at 16k, against SDPA's flash kernel;
3. training: a 6-layer, hidden-1024, 32k-vocabulary causal LM, bf16 autocast, AdamW, tokens/s and
   peak memory at 4k, 16k, 32k tokens, against the same stack with softmax (SDPA);
4. decoding: our decoding step compiled with CUDA graphs through `generate(compile_config=...)`
   against GPT-2 of the same shape on transformers' static cache, compiled; batch 1 and 32,
   contexts 4k and 32k.

Each section is written to the result file as soon as it is done (a run cut short keeps what it
measured). `ratios` holds ours over the baseline (> 1 = faster):

    python scripts/bench_gpu.py --update-figures      # docs/figures/gpu.json and gpu.png
    python scripts/bench_gpu.py --smoke --output /tmp/gpu.json   # CPU, tiny sizes, fla's reference kernel

On a machine whose image has an older transformers, install the wheels first (one call):
`pip install --no-deps wheels/*.whl && python scripts/bench_gpu.py --update-figures`.
"""

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from modeling_performer.recipes.bench_common import add_output_arguments, provenance, results_path

from modeling_performer import PerformerConfig, PerformerForCausalLM, fast_attention
from modeling_performer.attention import (
    causal_linear_attention,
    causal_windowed_attention,
    linear_attention,
    windowed_linear_attention,
)
from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix, hedgehog_init

# relative to the output's largest entry (fp32: Triton's dots may round through tf32)
TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def reference_kernel():
    """fla's reference implementation in the fast kernel's signature (the CPU smoke run's stand-in)."""
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla

    def kernel(q, k, v, g, scale, initial_state, output_final_state):
        if g is None:
            g = q.new_zeros(q.shape[:3])
        out, state = naive_chunk_simple_gla(q.float(), k.float(), v.float(), g, initial_state=initial_state,
                                            output_final_state=True, scale=scale)
        return out.to(q.dtype), state
    return kernel


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.kernel = reference_kernel() if args.smoke else fast_attention.kernel_for(self.device)
        if self.kernel is None:
            raise SystemExit(f"the fast path cannot run here: {fast_attention.INSTALL_HINT}, on a CUDA device")
        self.path = results_path(args, "gpu")
        self.record = {"device": "cpu (smoke run)" if args.smoke else torch.cuda.get_device_name(),
                       "versions": versions(), **provenance(), "settings": {"smoke": args.smoke}, "ratios": {}}

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.record, indent=1, default=str))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats=None):
        """Median seconds of fn() over a few runs after a warm-up, and peak memory above the start."""
        repeats = repeats or (2 if self.smoke else 5)
        fn()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeats):
            self.sync()
            clock = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - clock)
        peak = torch.cuda.max_memory_allocated() - start_bytes if self.device.type == "cuda" else None
        return sorted(times)[len(times) // 2], peak

    # ---------------------------------------------------------------------------------------

    def correctness(self):
        length, heads, dim = (48, 2, 16) if self.smoke else (1024, 8, 64)
        window = 4 if self.smoke else 64
        rows, failed = [], []
        for dtype in (torch.float32, torch.bfloat16):
            for feature_map, win, decayed in (("softmax", 0, False), ("relu", 0, False), ("hedgehog", 0, False),
                                              ("hedgehog", window, False), ("softmax", 0, True),
                                              ("hedgehog", 0, True), ("hedgehog", window, True)):
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(2, heads, length, dim, generator=g).to(self.device, dtype).requires_grad_()
                           for _ in range(3))
                # decay-gated linear attention: log gates of rates up to 0.1 per step
                log_decay = ((-0.1 * torch.rand(2, heads, length, generator=g)).to(self.device).requires_grad_()
                             if decayed else None)
                inputs = (q, k, v) if log_decay is None else (q, k, v, log_decay)
                mask = torch.ones(2, length, dtype=torch.bool, device=self.device)
                mask[1, :length // 8] = False
                features = feature_weights_for(feature_map, heads, dim, self.device)
                probe = torch.randn(2, heads, length, dim, generator=g).to(self.device) * mask[:, None, :, None]
                results = {}
                for name, kernel in (("pytorch", None), ("fast", self.kernel)):
                    if win:
                        out, _ = causal_windowed_attention(q, k, v, features, feature_map, win, None, mask, kernel=kernel,
                                                           log_decay=log_decay)
                    else:
                        out, _ = causal_linear_attention(q, k, v, features, feature_map, mask, kernel=kernel,
                                                         log_decay=log_decay)
                    grads = torch.autograd.grad((out.float() * probe).sum(), inputs)
                    results[name] = (out, *grads)
                errors = [relative(a, b, mask) for a, b in zip(results["fast"][:4], results["pytorch"][:4])]
                if log_decay is not None:  # the gates' gradient [B, H, T]
                    errors.append(relative(results["fast"][4][..., None], results["pytorch"][4][..., None], mask))
                row = {"dtype": str(dtype).replace("torch.", ""), "feature_map": feature_map, "window": win,
                       "linear_decay": decayed,
                       "output_error": errors[0], "grad_error": max(errors[1:]), "ok": max(errors) < TOLERANCE[dtype]}
                rows.append(row)
                if not row["ok"]:
                    failed.append(row)
                print(json.dumps(row), flush=True)
        self.record["correctness"] = rows
        self.record["fast_path_correct"] = not failed
        self.save()
        if failed:  # reported, and the exit status says so at the end; the timings still run
            print(f"THE FAST PATH DISAGREES WITH THE PYTORCH KERNELS: {failed}", flush=True)

    def kernels(self):
        heads, dim = (2, 16) if self.smoke else (8, 64)
        lengths = [128, 256] if self.smoke else [4096, 16384, 65536]
        window = 8 if self.smoke else 64
        projection = gaussian_orthogonal_random_matrix(256, dim).to(self.device)
        hedgehog = feature_weights_for("hedgehog", heads, dim, self.device)
        dtype = torch.float32 if self.smoke else torch.bfloat16
        rows = []
        for length in lengths:
            g = torch.Generator().manual_seed(1)
            q, k, v = (torch.randn(1, heads, length, dim, generator=g).to(self.device, dtype).requires_grad_()
                       for _ in range(3))
            grad = torch.randn(1, heads, length, dim, generator=g).to(self.device, dtype)
            gates = (-0.01 * torch.rand(1, heads, length, generator=g)).to(self.device)
            methods = {
                "sdpa causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                "favor causal": lambda: causal_linear_attention(q, k, v, projection, "softmax", kernel=self.kernel)[0],
                "hedgehog causal": lambda: causal_linear_attention(q, k, v, hedgehog, "hedgehog", kernel=self.kernel)[0],
                f"hedgehog + W{window} causal": lambda: causal_windowed_attention(
                    q, k, v, hedgehog, "hedgehog", window, kernel=self.kernel)[0],
                "hedgehog + decay causal": lambda: causal_linear_attention(
                    q, k, v, hedgehog, "hedgehog", kernel=self.kernel, log_decay=gates)[0],
            }
            if length == lengths[1]:
                methods.update({
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                    "favor": lambda: linear_attention(q, k, v, projection, "softmax"),
                    "hedgehog": lambda: linear_attention(q, k, v, hedgehog, "hedgehog"),
                    f"hedgehog + W{window}": lambda: windowed_linear_attention(q, k, v, hedgehog, "hedgehog", window),
                })
            for name, forward in methods.items():
                def step(forward=forward):
                    q.grad = k.grad = v.grad = None
                    forward().backward(grad)
                try:
                    seconds, peak = self.timed(step)
                    row = {"length": length, "method": name, "seconds": seconds, "peak_bytes": peak}
                except torch.OutOfMemoryError:
                    row = {"length": length, "method": name, "error": "out of memory"}
                rows.append(row)
                print(json.dumps(row), flush=True)
        self.record["kernels"] = rows
        ratios = self.record["ratios"]
        names = {0: "4k", 1: "16k", 2: "64k"}
        for index, length in enumerate(lengths):
            times = {r["method"]: r.get("seconds") for r in rows if r["length"] == length}
            for ours, suffix in (("favor causal", ""), ("hedgehog causal", "_hedgehog"),
                                 (f"hedgehog + W{window} causal", f"_hedgehog_w{window}"),
                                 ("hedgehog + decay causal", "_hedgehog_decay")):
                ratios[f"causal_fwd_bwd_vs_sdpa_{names[index]}{suffix}"] = ratio(times.get("sdpa causal"), times.get(ours))
            if index == 1:
                for ours, suffix in (("favor", ""), ("hedgehog", "_hedgehog"), (f"hedgehog + W{window}",
                                                                                 f"_hedgehog_w{window}")):
                    ratios[f"noncausal_fwd_bwd_vs_sdpa_16k{suffix}"] = ratio(times.get("sdpa"), times.get(ours))
        self.save()

    def training(self):
        shape = (dict(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
                 if self.smoke else dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=6,
                                         num_attention_heads=16, intermediate_size=4096))
        lengths = [64, 128] if self.smoke else [4096, 16384, 32768]
        kinds = {"softmax": dict(attention_type="softmax"), "favor": dict(num_random_features=256),
                 "hedgehog + W64": dict(feature_map="hedgehog", local_window=8 if self.smoke else 64)}
        rows = []
        for kind, extra in kinds.items():
            config = PerformerConfig(**shape, **extra, max_position_embeddings=max(lengths),
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            torch.manual_seed(0)
            model = PerformerForCausalLM(config).to(self.device)
            if self.smoke:  # the models' layers run the reference kernel as their fast path, on the CPU
                model.set_chunk_kernel(self.kernel, devices=("cpu",))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=self.device.type == "cuda")
            for length in lengths:
                ids = torch.randint(0, config.vocab_size, (1, length), device=self.device)

                def step():
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=not self.smoke):
                        loss = model(ids, labels=ids).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                try:
                    seconds, peak = self.timed(step, repeats=2 if self.smoke else 3)
                    row = {"kind": kind, "length": length, "tokens_per_s": length / seconds, "peak_bytes": peak}
                except torch.OutOfMemoryError:
                    row = {"kind": kind, "length": length, "error": "out of memory"}
                rows.append(row)
                print(json.dumps(row), flush=True)
            model = optimizer = None  # free the memory before the next kind
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.record["training"] = rows
        speed = {(r["kind"], r["length"]): r.get("tokens_per_s") for r in rows}
        for length, name in zip(lengths, ("4k", "16k", "32k")):
            self.record["ratios"][f"train_step_vs_softmax_{name}"] = ratio(speed[("favor", length)],
                                                                          speed[("softmax", length)])
            self.record["ratios"][f"train_step_vs_softmax_{name}_hedgehog_w64"] = ratio(
                speed[("hedgehog + W64", length)], speed[("softmax", length)])
        self.save()

    def decoding(self):
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.generation import CompileConfig

        layers, hidden, heads, vocab = (2, 64, 4, 500) if self.smoke else (6, 1024, 16, 32000)
        contexts = [64, 128] if self.smoke else [4096, 32768]
        batches = [1, 4] if self.smoke else [1, 32]
        new_tokens = 8 if self.smoke else 64
        dtype = torch.float32 if self.smoke else torch.bfloat16
        ours = PerformerForCausalLM(PerformerConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=max(contexts) + new_tokens, num_random_features=256,
            hidden_dropout_prob=0.0)).to(self.device, dtype).eval()
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                          bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                                          n_positions=max(contexts) + new_tokens)).to(self.device, dtype).eval()
        compile_config = None if self.smoke else CompileConfig(fullgraph=False, mode="reduce-overhead")
        rows = []
        for batch in batches:
            for context in contexts:
                prompt = torch.randint(0, vocab, (batch, context), device=self.device)
                for kind, model, extra in (("performer", ours, {}), ("gpt2 static", gpt2,
                                                                    {"cache_implementation": "static"})):
                    def generate(tokens, model=model, extra=extra):
                        with torch.inference_mode():
                            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                           compile_config=compile_config, disable_compile=self.smoke,
                                           pad_token_id=0, **extra)
                    try:
                        generate(new_tokens)  # compiles (and records the graphs) once per shape
                        full, _ = self.timed(lambda: generate(new_tokens), repeats=2)
                        prefill, _ = self.timed(lambda: generate(1), repeats=2)
                        row = {"kind": kind, "batch": batch, "context": context,
                               "ms_per_token": 1000 * (full - prefill) / (new_tokens - 1)}
                    except torch.OutOfMemoryError:
                        row = {"kind": kind, "batch": batch, "context": context, "error": "out of memory"}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        self.record["decoding"] = rows
        times = {(r["kind"], r["batch"], r["context"]): r.get("ms_per_token") for r in rows}
        for batch in batches:
            for context in contexts:
                key = f"decode_b{batch}_{context // 1024}k_vs_gpt2_static_compiled"
                self.record["ratios"][key] = ratio(times[("gpt2 static", batch, context)],
                                                   times[("performer", batch, context)])
        self.save()


def feature_weights_for(feature_map, heads, dim, device):
    if feature_map == "hedgehog":
        weights = hedgehog_init(heads, dim, dim) + 0.1 * torch.randn(2, heads, dim, dim,
                                                                    generator=torch.Generator().manual_seed(2))
        return weights[0].to(device), weights[1].to(device)
    return gaussian_orthogonal_random_matrix(256 if feature_map == "softmax" else 64, dim).to(device)


def relative(actual, expected, mask):
    diff = (actual.float() - expected.float()).abs()
    if diff.dim() == 4 and diff.shape[2] == mask.shape[1]:
        diff = diff * mask[:, None, :, None]
    return round(diff.max().item() / expected.float().abs().max().clamp_min(1e-30).item(), 6)


def ratio(baseline, ours):
    return round(baseline / ours, 3) if baseline and ours else None


def versions():
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda}
    for name in ("transformers", "fla", "triton"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # not installed, or failing to import
            found[name] = None
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU with fla's reference kernel: checks the script, measures nothing")
    parser.add_argument("--sections", nargs="+", default=["correctness", "kernels", "training", "decoding"],
                        choices=["correctness", "kernels", "training", "decoding"])
    add_output_arguments(parser, "gpu")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: bench_gpu.py measures a GPU (--smoke checks the script on the CPU)")
    bench = Bench(args)
    start = time.perf_counter()
    for section in args.sections:
        getattr(bench, section)()
        print(f"{section} done at {time.perf_counter() - start:.0f} s", flush=True)
    bench.record["seconds"] = round(time.perf_counter() - start, 1)
    bench.save()
    print(json.dumps(bench.record["ratios"], indent=1))
    print(f"wrote {bench.path}")
    if not bench.record.get("fast_path_correct", True):
        raise SystemExit("the fast path disagreed with the PyTorch kernels (see correctness in the result file)")


if __name__ == "__main__":
    main()
