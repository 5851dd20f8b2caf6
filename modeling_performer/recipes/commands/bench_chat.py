"""A linearized chat model against its teacher, at the teacher's real shape: decoding ms per token,
prefill seconds, time to the first token, cache bytes and peak memory, at contexts from 512 to 16k
tokens, batch 1 and 8, ratios taken in the same run.

The teacher is SmolLM2-135M-Instruct's shape (30 layers, hidden 576, 9 query / 3 key-value heads of
64, MLP 1536, vocabulary 49,152) as transformers' LlamaForCausalLM: its weights from the GGUF file
when `python scripts/prepare_data.py --datasets smollm2` has fetched it (dequantized to fp32),
random ones otherwise (speed does not depend on the weights; the results file says which). The
student is that model converted through the Llama path with Hedgehog maps and an exact window of
--window tokens (what the chat-lm recipe trains).

Every (model, mode, batch) runs in a fresh process over the contexts in increasing order:
- eager: the teacher with transformers' default (dynamic) cache, the student with its own;
- compiled: the decoding step under torch.compile (the prefill stays eager), the teacher with
  transformers' static cache sized for the context, as generate() does with a compile_config.
At batch 1 each context is prefilled with one forward (a random prompt of that length; the time is
`prefill_s`) and timed again through generate(max_new_tokens=1) (`ttft_s`: what a chat user waits
for); batch 8 repeats the batch-1 cache 8 times (the teacher's static cache is filled from it), so
its decoding steps start from the same context without 8 prefills. Decoding: --steps timed steps
after --warmup steps (which compile in compiled mode), median.

    python scripts/bench_chat.py                                  # everything, about 40 minutes on 2 cores
    python scripts/bench_chat.py --contexts 512 2048 --batches 1 --modes eager
    python scripts/bench_chat.py --device cuda --dtype bfloat16   # the same file from a GPU, in one run
    python scripts/bench_chat.py --replot

With both student kinds (--kinds student student_decay), a further process per batch alternates
their eager decoding steps over the same contexts (`paired_decode`): the gate's step cost with the
machine's drift shared (decay_ratios' ms_per_token_paired_decay_over_student).

Writes outputs/bench/chat_decode.json and .png (chat_decode_gpu.* with --device cuda);
--update-figures writes the committed docs/figures/chat_decode.* (chat_decode_gpu.*).
"""

import argparse
import ctypes
import gc
import json
import pathlib
import resource
import statistics
import sys
import tempfile
import time

from modeling_performer.cache_performer import cache_bytes
from modeling_performer.recipes.bench_common import (
    ROOT, add_output_arguments, handled_without_measuring, measure_in_process, save_and_draw, status_kib,
    synchronize,
)

GGUF = ROOT / "data_cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# student_decay: the student with decay-gated linear attention (--linear-decay), beside the ungated one
KINDS = ("student", "teacher", "student_decay")
MODES = ("eager", "compiled")
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, intermediate_size=1536, rope_theta=100000.0,
                     rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
# The same head layout at toy size (tests of this script).
TINY_SHAPE = {**SMOLLM2_SHAPE, "vocab_size": 256, "hidden_size": 96, "num_hidden_layers": 2, "head_dim": 32,
              "num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 128}


def uses_gguf(args) -> bool:
    """Whether the teacher's weights come from SmolLM2's GGUF file."""
    return args.shape != "tiny" and (args.weights == "gguf" or (args.weights == "auto" and GGUF.exists()))


def teacher_weights(args):
    """(LlamaForCausalLM of the chat model's shape, where its weights came from)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    longest = max(args.contexts) + args.warmup + args.steps + 8
    if args.shape == "tiny":
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY_SHAPE, max_position_embeddings=longest)), "random (seed 0), tiny"
    if args.weights == "gguf" and not GGUF.exists():
        raise SystemExit(f"{GGUF} is missing: run python scripts/prepare_data.py --datasets smollm2")
    if uses_gguf(args):
        loaded = LlamaForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
        config = loaded.config
        config.max_position_embeddings = max(config.max_position_embeddings, longest)
        config.quantization_config = None
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        return model, f"{GGUF.name} (dequantized)"
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, max_position_embeddings=longest)), "random (seed 0)"


def build(kind, args):
    """(the model, where the teacher's weights came from). The student is what the package's converter
    makes of the teacher's folder (saved aside with a tokenizer, as the converter takes it)."""
    import torch
    from transformers import AutoTokenizer

    from modeling_performer.bundled import tokenizer_path
    from modeling_performer.conversion import convert_to_performer

    teacher, source = teacher_weights(args)
    teacher.config._attn_implementation = "sdpa"
    if kind == "teacher":
        model = teacher
    else:
        with tempfile.TemporaryDirectory() as folder:
            teacher.save_pretrained(folder)
            del teacher
            tokenizer = (AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name) if uses_gguf(args)
                         else AutoTokenizer.from_pretrained(tokenizer_path()))
            tokenizer.save_pretrained(folder)
            decay = {"linear_decay": args.linear_decay} if kind == "student_decay" else {}
            model, _ = convert_to_performer(folder, "favor", feature_map="hedgehog", local_window=args.window,
                                            **decay)
    dtype = getattr(torch, args.dtype)
    return model.to(device=args.device, dtype=dtype).eval(), source


def release_freed_memory():
    """Frees what nothing references and hands glibc's free heap back to the system (the measuring
    processes keep freed memory otherwise: bench_common.MALLOC_ENV)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss():
    """Starts the peak resident memory (VmHWM) over from the current one (Linux; elsewhere the peak
    stays the process's, model building included)."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    peak = status_kib("VmHWM:")  # 0 where /proc is missing: the process's peak instead
    return peak / 1024 if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decoding_cache(kind, mode, model, cache, batch, total):
    """The cache decoding steps start from: the prefill's, repeated `batch` times; in compiled mode the
    teacher's goes into transformers' static cache (`total` positions), the one it can compile."""
    from transformers import StaticCache

    if batch > 1:
        cache.batch_repeat_interleave(batch)
    if kind.startswith("student") or mode == "eager":
        return cache
    static = StaticCache(config=model.config, max_cache_len=total)
    for index, layer in enumerate(cache.layers):
        static.update(layer.keys, layer.values, index)
    return static


def measure_context(kind, mode, model, batch, context, args, step_fn):
    import torch

    device = args.device
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=g).to(device)
    row = {"context": context}
    release_freed_memory()  # what the previous context freed is not this one's
    reset_peak_rss()
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        synchronize(device)
        if batch == 1:
            row["prefill_s"] = time.perf_counter() - start
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1).repeat(batch, 1)
        del out
        if batch == 1 and mode == "eager":
            synchronize(device)
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           pad_token_id=0)
            synchronize(device)
            row["ttft_s"] = time.perf_counter() - start
        total = context + args.warmup + args.steps + 1
        cache = decoding_cache(kind, mode, model, cache, batch, total)
        times = []
        for step in range(args.warmup + args.steps):
            position = torch.full((batch, 1), context + step, dtype=torch.long, device=device)
            synchronize(device)
            start = time.perf_counter()
            out = step_fn(input_ids=token, position_ids=position, cache=cache, use_cache=True)
            synchronize(device)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
        row["ms_per_token"] = 1e3 * statistics.median(times[args.warmup:])
        row["warmup_s"] = sum(times[:args.warmup])
        row["cache_mib"] = cache_bytes(cache) / 2**20
        del cache, out
    row["peak_rss_mib"] = peak_rss_mib()  # the model's weights included
    if device.startswith("cuda"):
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def paired_decode(args, batch):
    """The gated and the ungated student in one process, their decoding steps alternating over the
    same contexts: each step's time against the other's, with the machine's drift the same for both
    (the separate runs above are minutes apart). -> rows of both kinds' median ms per token."""
    import torch

    models = {kind: build(kind, args)[0] for kind in ("student", "student_decay")}
    rows = []
    for context in sorted(args.contexts):
        g = torch.Generator().manual_seed(context)
        ids = torch.randint(3, models["student"].config.vocab_size, (1, context), generator=g).to(args.device)
        state, times = {}, {kind: [] for kind in models}
        with torch.inference_mode():
            for kind, model in models.items():
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                if batch > 1:
                    out.cache.batch_repeat_interleave(batch)
                state[kind] = [out.cache, out.logits[:, -1:].argmax(-1).repeat(batch, 1)]
            for step in range(args.warmup + args.steps):
                position = torch.full((batch, 1), context + step, dtype=torch.long, device=args.device)
                for kind, model in models.items():
                    cache, token = state[kind]
                    synchronize(args.device)
                    start = time.perf_counter()
                    out = model(input_ids=token, position_ids=position, cache=cache, use_cache=True)
                    synchronize(args.device)
                    times[kind].append(time.perf_counter() - start)
                    state[kind][1] = out.logits[:, -1:].argmax(-1)
        rows += [{"kind": kind, "mode": "eager", "batch": batch, "context": context, "paired": True,
                  "ms_per_token": 1e3 * statistics.median(times[kind][args.warmup:])} for kind in models]
        del state
    return rows


def worker(args):
    import torch

    kind, mode, batch = args.worker[0], args.worker[1], int(args.worker[2])
    if kind == "paired":
        print(json.dumps({"rows": paired_decode(args, batch)}))
        return
    model, source = build(kind, args)
    release_freed_memory()  # the student's source model is gone: its memory is not the student's
    step_fn = model
    if mode == "compiled":
        # Symbolic shapes from the first compile: the position (and the teacher's cache fill) change
        # every step, and a specialised graph would recompile for each of them.
        step_fn = torch.compile(model, fullgraph=True, dynamic=True)
    rows = []
    for context in sorted(args.contexts):
        row = measure_context(kind, mode, model, batch, context, args, step_fn)
        rows.append({"kind": kind, "mode": mode, "batch": batch, **row})
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"rows": rows, "weights": source, "device_name": device_name,
                      "threads": torch.get_num_threads()}))


def ratios(rows):
    """teacher / student for every measure, pairing the same mode, batch and context, and the student
    in either mode against the teacher's eager and compiled runs."""
    index = {(r["kind"], r["mode"], r["batch"], r["context"]): r for r in rows}
    out = []
    for (kind, mode, batch, context), student in sorted(index.items()):
        if kind != "student":
            continue
        for teacher_mode in MODES:
            teacher = index.get(("teacher", teacher_mode, batch, context))
            if teacher is None:
                continue
            entry = {"student_mode": mode, "teacher_mode": teacher_mode, "batch": batch, "context": context}
            for key in ("ms_per_token", "prefill_s", "ttft_s", "cache_mib", "peak_rss_mib"):
                if key in student and key in teacher:
                    entry[f"{key}_teacher_over_student"] = teacher[key] / student[key]
            out.append(entry)
    return out


def decay_ratios(rows, paired=()):
    """The decay gate's cost: student_decay / student for every measure, same mode, batch and context;
    with `paired` rows (see `paired_decode`), the decoding step's ratio from them as well
    (ms_per_token_paired_decay_over_student)."""
    index = {(r["kind"], r["mode"], r["batch"], r["context"]): r for r in rows}
    pairs = {(r["kind"], r["batch"], r["context"]): r["ms_per_token"] for r in paired}
    out = []
    for (kind, mode, batch, context), gated in sorted(index.items()):
        plain = index.get(("student", mode, batch, context))
        if kind != "student_decay" or plain is None:
            continue
        entry = {"mode": mode, "batch": batch, "context": context}
        for key in ("ms_per_token", "prefill_s", "ttft_s", "cache_mib"):
            if key in gated and key in plain:
                entry[f"{key}_decay_over_student"] = gated[key] / plain[key]
        if mode == "eager" and ("student_decay", batch, context) in pairs and ("student", batch, context) in pairs:
            entry["ms_per_token_paired_decay_over_student"] = (pairs[("student_decay", batch, context)]
                                                               / pairs[("student", batch, context)])
        out.append(entry)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS[:2]),
                        help="student_decay: the student with --linear-decay, to price the decay gate")
    parser.add_argument("--linear-decay", choices=["head", "data"], default="data",
                        help="the gate of the student_decay kind")
    parser.add_argument("--steps", type=int, default=16, help="timed decoding steps per point (median)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="decoding steps before the timed ones (they compile in compiled mode)")
    parser.add_argument("--window", type=int, default=64, help="the student's exact local window")
    parser.add_argument("--weights", choices=["auto", "gguf", "random"], default="auto",
                        help="the teacher's weights: the SmolLM2 GGUF (auto: when it is present) or random ones")
    parser.add_argument("--shape", choices=["smollm2", "tiny"], default="smollm2",
                        help="tiny: 2 layers of the same head layout, random weights (to try the script quickly)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_output_arguments(parser, "chat_decode")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from the results file")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or min(args.contexts) < 1 or min(args.batches) < 1:
        parser.error("--steps, --contexts and --batches must be positive and --warmup >= 0")
    name = "chat_decode" if args.device == "cpu" else "chat_decode_gpu"  # the CPU figure is kept
    if handled_without_measuring(name, args, worker):
        return
    rows, meta = [], {}
    for batch in sorted(args.batches):
        for mode in args.modes:
            for kind in args.kinds:
                result = measure_in_process(sys.argv[0], (kind, mode, batch), abort_on_error=True)
                meta = {k: v for k, v in result.items() if k != "rows"}
                for r in result["rows"]:
                    rows.append(r)
                    extras = " ".join(f"{k} {r[k]:.3f}" for k in ("prefill_s", "ttft_s") if k in r)
                    print(f"{kind:>13} {mode:>8} batch {batch} context {r['context']:>6}: {r['ms_per_token']:8.2f} "
                          f"ms/token, cache {r['cache_mib']:8.1f} MiB, peak RSS {r['peak_rss_mib']:7.0f} MiB {extras}",
                          flush=True)
    table = ratios(rows)
    for entry in table:
        parts = " ".join(f"{k.split('_teacher')[0]} x{v:.2f}" for k, v in entry.items() if k.endswith("student"))
        print(f"teacher {entry['teacher_mode']} / student {entry['student_mode']}, batch {entry['batch']}, "
              f"context {entry['context']}: {parts}")
    record = {**meta, "rows": rows, "ratios": table}
    if "student_decay" in args.kinds:
        paired = []
        if "student" in args.kinds and "eager" in args.modes:
            for batch in sorted(args.batches):
                paired += measure_in_process(sys.argv[0], ("paired", "eager", batch), abort_on_error=True)["rows"]
        record["paired_decode"] = paired
        record["decay_ratios"] = decay_ratios(rows, paired)
        for entry in record["decay_ratios"]:
            parts = " ".join(f"{k.split('_decay_over')[0]} x{v:.3f}" for k, v in entry.items() if k.endswith("student"))
            print(f"decay / ungated student, {entry['mode']}, batch {entry['batch']}, context {entry['context']}: {parts}")
    save_and_draw(name, args, record)


if __name__ == "__main__":
    main()
