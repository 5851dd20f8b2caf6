#!/usr/bin/env python
"""Chat models behind transformers' own server (`python -m modeling_performer.serve`, which serves
any other model exactly as `transformers serve` does): concurrent OpenAI-client requests with long
prompts, for a linearized model against its softmax teacher served the same way.

For each model a server starts on a free loopback port; for each context length, `--clients`
threads each send `--requests` streaming chat requests (a held-out play cut so that prompt and
answer fill the context, then a question; greedy, exactly `--new-tokens` answer tokens). Reported per
point: requests/s and generated tokens/s over the wall time, time to first token (TTFT) and
per-request decode tokens/s (after the first token), mean and median.

The server answers one request at a time (`generate()` per request; continuous batching keeps a
paged key/value cache that a recurrent model has no place for), so concurrent clients queue: TTFT
includes the wait for the requests ahead, for both models alike.

    python scripts/bench_chat_server.py outputs/smollm2-hedgehog-w64 \\
        data_cache/smollm2:SmolLM2-135M-Instruct.Q4_1.gguf --contexts 2048 8192 --update-figures

Writes outputs/bench/serving_chat.json (or docs/figures/serving_chat.json with --update-figures)
and its figure. Points already in the file are kept (a killed run resumes where it stopped).
"""

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import time

from modeling_performer.recipes.bench_common import ROOT, add_output_arguments, provenance, results_path

NAME = "serving_chat"
QUESTION = "\n\nIn one sentence: who speaks first in this scene?"


def prompt_of(tokenizer, tokens: int) -> str:
    """A held-out play cut to `tokens` tokens (with the chat template and the question around it)."""
    from modeling_performer.bundled import lm_eval_tasks_path

    text = "\n\n".join(json.loads(line)["text"] for line in open(lm_eval_tasks_path() / "plays_test.jsonl"))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    overhead = len(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])
    return tokenizer.decode(ids[: max(tokens - overhead, 1)]) + QUESTION


def one_request(client, model: str, prompt: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    first, pieces = None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
        # Every answer is exactly new_tokens long (the end-of-turn token does not stop it), so that both
        # models do the same work: transformers serve takes generate() settings as a JSON string.
        extra_body={"generation_config": json.dumps({"min_new_tokens": new_tokens})})
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    generated = usage.completion_tokens if usage is not None else pieces
    return {"ttft_s": (first or end) - start, "latency_s": end - start, "generated": generated,
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "decode_tokens_per_s": (generated - 1) / (end - first) if first and end > first and generated > 1 else None}


def measure(model: str, url: str, prompt: str, args) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    try:
        one_request(client, model, prompt, 2)  # warm-up (the first request pays for lazy set-up), and a check
    except openai.BadRequestError as error:
        raise SystemExit(f"{model} refused the prompt: {error}") from None
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        runs = list(pool.map(lambda _: one_request(client, model, prompt, args.new_tokens),
                             range(args.clients * args.requests)))
    wall = time.perf_counter() - start
    decode = [r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"]]
    return {
        "requests": len(runs), "wall_s": round(wall, 2), "prompt_tokens": runs[0]["prompt_tokens"],
        "requests_per_s": round(len(runs) / wall, 4),
        "tokens_per_s": round(sum(r["generated"] for r in runs) / wall, 3),
        "generated_per_request": statistics.mean(r["generated"] for r in runs),
        "ttft_s_mean": round(statistics.mean(r["ttft_s"] for r in runs), 3),
        "ttft_s_median": round(statistics.median(r["ttft_s"] for r in runs), 3),
        "ttft_s_min": round(min(r["ttft_s"] for r in runs), 3),
        "decode_tokens_per_s_median": round(statistics.median(decode), 3) if decode else None,
        "latency_s_mean": round(statistics.mean(r["latency_s"] for r in runs), 3),
    }


def draw(data: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    models = list(dict.fromkeys(r["label"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    metrics = [("requests_per_s", "requests / s"), ("ttft_s_min", "time to first token, alone (s)"),
               ("decode_tokens_per_s_median", "decode tokens / s per request")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    width = 0.8 / max(len(models), 1)
    for ax, (key, title) in zip(axes, metrics):
        for i, label in enumerate(models):
            values = [next((r[key] or 0 for r in rows if r["label"] == label and r["context"] == c), 0)
                      for c in contexts]
            ax.bar([j + i * width for j in range(len(contexts))], values, width, label=label)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(contexts))],
                      [f"{c} tokens" for c in contexts])
        ax.set_title(title)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(models), fontsize=9)
    fig.suptitle(f"transformers serve, {data['clients']} concurrent clients, {data['device']}")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders (or FOLDER:FILE.gguf) to serve, one after the other")
    parser.add_argument("--labels", nargs="*", help="a name per model for the figure (default: the paths)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192], help="prompt lengths in tokens")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from the results file")
    add_output_arguments(parser, NAME)
    args = parser.parse_args(argv)
    labels = args.labels or args.models
    if len(labels) != len(args.models):
        parser.error("--labels needs one name per model")
    path = results_path(args, NAME)
    if args.replot:
        draw(json.loads(path.read_text()), path.with_suffix(".png"))
        return
    from transformers import AutoTokenizer

    from modeling_performer import serve  # importing it registers the Performer classes

    data = json.loads(path.read_text()) if path.exists() else {"results": []}
    data.update({"clients": args.clients, "requests_per_client": args.requests, "new_tokens": args.new_tokens,
                 "device": f"{args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"})
    for model, label in zip(args.models, labels):
        todo = [c for c in args.contexts
                if not any(r["model"] == model and r["context"] == c for r in data["results"])]
        if not todo:
            continue
        repo, gguf_file = serve.split_gguf(model)
        tokenizer = AutoTokenizer.from_pretrained(repo, **({"gguf_file": gguf_file} if gguf_file else {}))
        try:
            process, url = serve.start(model, "--device", args.device, "--log-level", "warning", cwd=ROOT,
                                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        except RuntimeError as error:
            raise SystemExit(str(error)) from None
        try:
            for context in todo:
                row = {"model": model, "label": label, "context": context,
                       **measure(model, url, prompt_of(tokenizer, context - args.new_tokens), args)}
                print(json.dumps(row), flush=True)
                data["results"].append(row)
                data.update(provenance())
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1))
                tmp.replace(path)
        finally:
            serve.stop(process)
    draw(data, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
