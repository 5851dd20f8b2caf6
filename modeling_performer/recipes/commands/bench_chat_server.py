"""Chat models behind transformers' own server (`python -m modeling_performer.serve`, which serves
any other model exactly as `transformers serve` does): concurrent OpenAI-client requests with long
prompts, for a linearized model against its softmax teacher served the same way.

For each model and batching mode (--batching off on: the server's --continuous-batching) a server
starts on a free loopback port; for each context length and each number of --clients, that many
threads each send --requests streaming chat requests at once (a held-out play cut so that prompt
and answer fill the context, each request its own cut, then a question; greedy, exactly
--new-tokens answer tokens).
Reported per point: requests/s and answer tokens/s over the wall time (prefills included), the
aggregate decode rate (the tokens after the first ones over the time any request was decoding:
the union of their decoding intervals), time to first token (TTFT) p50 / p95 / alone, per-request decode tokens/s, and the
peak resident memory of the server's processes.

Without batching the server answers one request at a time (`generate()` per request), so
concurrent clients queue: TTFT includes the wait for the requests ahead. With it, a Performer's
requests decode together (its own manager, see modeling_performer.batching), as the teacher's do
under transformers' paged continuous batching.

    python scripts/bench_chat_server.py outputs/smollm2-hedgehog-w64 \\
        data_cache/smollm2:SmolLM2-135M-Instruct.Q4_1.gguf --contexts 2048 8192 --clients 1 4 16 32 \\
        --batching off on --update-figures

Writes outputs/bench/serving_chat.json (or docs/figures/serving_chat.json with --update-figures)
and its figure. Points already in the file are kept (a killed run resumes where it stopped); a
point of an earlier version of the file, without a batching mode, counts as "off" with the file's
client count.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import threading
import time

from modeling_performer.recipes.bench_common import ROOT, add_output_arguments, provenance, results_path

NAME = "serving_chat"
QUESTION = "\n\nIn one sentence: who speaks first in this scene?"


def prompts_of(tokenizer, tokens: int, count: int, stride: int = 131) -> list[str]:
    """`count` prompts of the held-out plays cut to `tokens` tokens each (with the chat template and
    the question around it), prompt i starting `stride` * i tokens in: every request reads its own
    text, so no server can answer one from another's cached prefix."""
    from modeling_performer.bundled import lm_eval_tasks_path

    text = "\n\n".join(json.loads(line)["text"] for line in open(lm_eval_tasks_path() / "plays_test.jsonl"))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    overhead = len(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])
    length = max(tokens - overhead, 1)
    if stride * (count - 1) + length > len(ids):
        raise SystemExit(f"the held-out plays hold {len(ids)} tokens: too few for {count} prompts of {tokens}")
    return [tokenizer.decode(ids[stride * i: stride * i + length]) + QUESTION for i in range(count)]


def one_request(client, model: str, prompt: str, new_tokens: int, batching: str = "off") -> dict:
    start = time.perf_counter()
    first, pieces = None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
        # Every answer is exactly new_tokens long (the end-of-turn token does not stop it), so that both
        # models do the same work: transformers serve takes generate() settings as a JSON string. Its
        # batching path passes no min_new_tokens on, but it does pass the end tokens: none, there.
        extra_body={"generation_config": json.dumps({"min_new_tokens": new_tokens} if batching == "off"
                                                    else {"eos_token_id": -1})})
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
            "decoding": (first, end) if first and end > first and generated > 1 else None,
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "decode_tokens_per_s": (generated - 1) / (end - first) if first and end > first and generated > 1 else None}


class PeakMemory:
    """The peak resident memory (MiB) of a process and its children, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        import psutil

        while not self.done.is_set():
            total = 0
            for process in [self.root, *self.root.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total / 2**20)
            self.done.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def measure(model: str, url: str, prompts: list, clients: int, args, pid: int, batching: str) -> dict:
    """prompts: one for the warm-up, then one per request."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    try:
        one_request(client, model, prompts[0], 2)  # warm-up (the first request pays for lazy set-up), and a check
    except openai.BadRequestError as error:
        raise SystemExit(f"{model} refused the prompt: {error}") from None
    start = time.perf_counter()
    with PeakMemory(pid) as memory, concurrent.futures.ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda prompt: one_request(client, model, prompt, args.new_tokens, batching),
                             prompts[1:]))
    wall = time.perf_counter() - start
    decode = [r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"]]
    ttft = sorted(r["ttft_s"] for r in runs)
    # The aggregate decode rate: tokens after the first ones over the time any request was decoding
    # (the union of the requests' decoding intervals), so requests served one after the other add
    # their intervals and requests decoding together share theirs.
    spans, covered, reach = sorted(r["decoding"] for r in runs if r["decoding"]), 0.0, float("-inf")
    for begin, finish in spans:
        covered += max(0.0, finish - max(begin, reach))
        reach = max(reach, finish)
    after_first = sum(r["generated"] - 1 for r in runs if r["decoding"])
    return {
        "requests": len(runs), "wall_s": round(wall, 2), "prompt_tokens": runs[0]["prompt_tokens"],
        "requests_per_s": round(len(runs) / wall, 4),
        "tokens_per_s": round(sum(r["generated"] for r in runs) / wall, 3),
        "decode_tokens_per_s_aggregate": round(after_first / covered, 3) if covered else None,
        "generated_per_request": statistics.mean(r["generated"] for r in runs),
        "ttft_s_mean": round(statistics.mean(ttft), 3),
        "ttft_s_median": round(statistics.median(ttft), 3),
        "ttft_s_p95": round(ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))], 3),
        "ttft_s_min": round(ttft[0], 3),
        "decode_tokens_per_s_median": round(statistics.median(decode), 3) if decode else None,
        "latency_s_mean": round(statistics.mean(r["latency_s"] for r in runs), 3),
        "peak_rss_mib": round(memory.peak, 1),
    }


def point_key(row: dict, default_clients: int) -> tuple:
    """(model, batching, clients, context) of a result; rows of the earlier file format have neither
    a batching mode nor a client count: one generate() at a time, the file's clients."""
    return row["model"], row.get("batching", "off"), row.get("clients", default_clients), row["context"]


def draw(data: dict, path):
    """Per context: answer tokens/s of all clients and TTFT p50 against the number of clients, a line
    per model and batching mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default_clients = data.get("clients", 1)
    rows = [(point_key(r, default_clients), r) for r in data["results"]]
    contexts = sorted({key[3] for key, _ in rows})
    lines = list(dict.fromkeys((r["label"], key[1]) for key, r in rows))
    metrics = [("tokens_per_s", "answer tokens / s, all clients"), ("ttft_s_median", "time to first token, p50 (s)")]
    fig, axes = plt.subplots(len(metrics), len(contexts), figsize=(5 * len(contexts), 7), squeeze=False)
    for column, context in enumerate(contexts):
        for row_index, (metric, title) in enumerate(metrics):
            ax = axes[row_index][column]
            for label, batching in lines:
                points = sorted((key[2], r[metric]) for key, r in rows
                                if r["label"] == label and key[1] == batching and key[3] == context)
                if points:
                    ax.plot(*zip(*points), marker="o",
                            label=f"{label}, {'continuous batching' if batching == 'on' else 'one at a time'}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_title(f"{title}, {context} tokens", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(f"transformers serve, {data['device']}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratios(data: dict) -> dict:
    """scaling: per model, batching mode and context, each client count's answer tokens/s and aggregate
    decode rate over one client's; against: the first model's answer tokens/s over each other
    model's, same context and clients, every pairing of batching modes."""
    default_clients = data.get("clients", 1)
    points = {point_key(r, default_clients): r for r in data["results"]}
    scaling, against = [], []
    models = list(dict.fromkeys(key[0] for key in points))
    for (model, batching, clients, context), row in sorted(points.items()):
        alone = points.get((model, batching, 1, context))
        if alone is not None and clients > 1:
            scaling.append({"model": model, "batching": batching, "clients": clients, "context": context,
                            "tokens_per_s_over_one_client": round(row["tokens_per_s"] / alone["tokens_per_s"], 3),
                            "decode_aggregate_over_one_client": round(row["decode_tokens_per_s_aggregate"]
                                                                      / alone["decode_tokens_per_s_aggregate"], 3)
                            if row.get("decode_tokens_per_s_aggregate") and alone.get("decode_tokens_per_s_aggregate")
                            else None})
        if model != models[0]:
            continue
        for other_key, other in sorted(points.items()):
            if other_key[0] != model and other_key[2:] == (clients, context):
                against.append({"model": model, "batching": batching, "other": other_key[0],
                                "other_batching": other_key[1], "clients": clients, "context": context,
                                "tokens_per_s_over_other": round(row["tokens_per_s"] / other["tokens_per_s"], 3)})
    return {"scaling": scaling, "against": against}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders (or FOLDER:FILE.gguf) to serve, one after the other")
    parser.add_argument("--labels", nargs="*", help="a name per model for the figure (default: the paths)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192], help="prompt lengths in tokens")
    parser.add_argument("--clients", type=int, nargs="+", default=[4], help="numbers of concurrent clients")
    parser.add_argument("--batching", nargs="+", choices=["off", "on"], default=["off"],
                        help="serve without and/or with --continuous-batching")
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

    if min(args.clients) < 1 or args.requests < 1:
        parser.error("--clients and --requests must be positive")
    data = json.loads(path.read_text()) if path.exists() else {"results": []}
    default_clients = data.setdefault("clients", args.clients[0])  # what rows without a client count had
    data.update({"requests_per_client": args.requests, "new_tokens": args.new_tokens,
                 "device": f"{args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"})
    done = {point_key(r, default_clients) for r in data["results"]}
    for (model, label), batching in [(pair, mode) for pair in zip(args.models, labels) for mode in args.batching]:
        todo = [(c, n) for c in args.contexts for n in sorted(args.clients) if (model, batching, n, c) not in done]
        if not todo:
            continue
        repo, gguf_file = serve.split_gguf(model)
        tokenizer = AutoTokenizer.from_pretrained(repo, **({"gguf_file": gguf_file} if gguf_file else {}))
        flags = ["--continuous-batching"] if batching == "on" else []
        try:
            process, url = serve.start(model, "--device", args.device, "--log-level", "warning", *flags, cwd=ROOT,
                                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        except RuntimeError as error:
            raise SystemExit(str(error)) from None
        try:
            for context, clients in todo:
                row = {"model": model, "label": label, "batching": batching, "clients": clients, "context": context,
                       "new_tokens": args.new_tokens,
                       "distinct_prompts": True,
                       **measure(model, url, prompts_of(tokenizer, context - args.new_tokens, 1 + clients * args.requests),
                                 clients, args,
                                 process.pid, batching)}
                print(json.dumps(row), flush=True)
                data["results"].append(row)
                data.update(provenance())
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1))
                tmp.replace(path)
        finally:
            serve.stop(process)
    data["ratios"] = ratios(data)
    for entry in data["ratios"]["scaling"]:
        print(f"{entry['model']} batching {entry['batching']}, {entry['clients']} clients, {entry['context']} tokens: "
              f"answer tokens/s x{entry['tokens_per_s_over_one_client']}, aggregate decode "
              f"x{entry['decode_aggregate_over_one_client']} one client's")
    for entry in data["ratios"]["against"]:
        print(f"{entry['model']} ({entry['batching']}) / {entry['other']} ({entry['other_batching']}), "
              f"{entry['clients']} clients, {entry['context']} tokens: answer tokens/s x{entry['tokens_per_s_over_other']}")
    path.write_text(json.dumps(data, indent=1))
    draw(data, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
